"""A lab HTTP workload: answers every request (any method, HTTP/1.1 keep-alive) with JSON naming itself and
echoing what it received: method, path, headers, body length and the client address it saw. A WebSocket
upgrade gets its 101 and then every byte back upper-cased. `--status CODE` answers CODE instead of 200
(a failing canary)."""

from __future__ import annotations

import argparse
import http.server
import json
import socket


def serve(name: str, port: int, status: int = 200) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once, as real servers send them

        def log_message(self, *_args) -> None:
            pass

        def _answer(self) -> None:
            if self.headers.get("Upgrade", "").lower() == "websocket":
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.end_headers()
                self.wfile.flush()
                while data := self.connection.recv(4096):
                    self.connection.sendall(data.upper())
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            out = json.dumps(
                {
                    "name": name,
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body_bytes": len(body),
                    "client": self.client_address[0].removeprefix("::ffff:"),
                }
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6  # dual-stack: IPv4 clients arrive as mapped addresses
        daemon_threads = True

    server = Server(("::", port), Handler)
    print(f"{name} serving http/{port}", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    serve(args.name, args.port, args.status)


if __name__ == "__main__":
    main()
