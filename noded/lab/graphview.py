"""`noded lab graph`: the lab-wide traffic graph, every node's part merged (noded/graph.py), served with
the same page on a loopback port of the machine. Each node's snapshot is read from its metrics port
inside the node's network namespace (the lab's own; nothing leaves loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from noded import graph
from noded.lab import netns
from noded.lab.lab import Lab

FETCH = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:10249/graph/snapshot.json', timeout=3).read().decode())"
)


def snapshots(lab: Lab) -> list[dict]:
    """Every node's snapshot; a node that does not answer is left out (its daemon may be restarting)."""
    out = []
    for node in lab.state()["nodes"].values():
        res = subprocess.run(
            netns.nsenter_argv(node["netns"], [sys.executable, "-c", FETCH]), capture_output=True, text=True, timeout=10
        )
        if res.returncode == 0:
            out.append(json.loads(res.stdout))
    return out


def serve(lab: Lab, port: int = 0) -> ThreadingHTTPServer:
    """The page at http://127.0.0.1:PORT/ (and /graph), the merged JSON at /graph.json; in a thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in ("/", "/graph"):
                body, kind = graph.PAGE.encode(), "text/html; charset=utf-8"
            elif self.path.split("?")[0] == "/graph.json":
                body, kind = json.dumps(graph.merge(snapshots(lab))).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
