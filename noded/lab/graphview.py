"""`noded lab graph`: the lab-wide traffic graph, every node's part merged (noded/graph.py), served with
the same page on a loopback port of the machine. Each node's snapshot is read from its metrics port
inside the node's network namespace (the lab's own; nothing leaves loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import ThreadingHTTPServer

from noded import graph, observe
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
    """The page at http://127.0.0.1:PORT/ (and /graph), the merged JSON at /graph.json; in a thread (the
    daemon's own bounded server, noded/observe.py)."""

    def page() -> tuple[int, str, str]:
        return 200, "text/html; charset=utf-8", graph.PAGE

    return observe.serve(
        ("127.0.0.1", port),
        {
            "/": page,
            "/graph": page,
            "/graph.json": lambda: (200, "application/json", json.dumps(graph.merge(snapshots(lab)))),
        },
        "lab-graph",
    )
