"""The daemon's end of the static noded-cni (cni/noded-cni.c): `cni.sock` beside the API socket, where the
plugin forwards each CNI call it gets from the runtime (the CNI_* variables, an empty line, the network
configuration) and reads back the exit code on the first line and what to print after it. The call is
answered by noded's own plugin logic (plugin.call), as the Python launcher would answer it.

Bounded: 1 MiB a request, 64 connections at once, 30 s a connection.
"""

from __future__ import annotations

import os
import socketserver
import threading

import structlog

from noded.bounded import BoundedConnections
from noded.cni.plugin import call

log = structlog.get_logger("noded.cni.forward")

MAX_REQUEST = 1 << 20
MAX_CONNECTIONS = 64
TIMEOUT = 30.0
VARIABLES = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")


def parse_request(data: bytes) -> tuple[dict[str, str], str]:
    head, _, body = data.partition(b"\n\n")
    env = {}
    for line in head.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key in VARIABLES:
            env[key] = value
    return env, body.decode("utf-8", "replace")


class _Handler(socketserver.StreamRequestHandler):
    timeout = TIMEOUT

    def handle(self) -> None:
        chunks, size = [], 0
        while size <= MAX_REQUEST:
            chunk = self.connection.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_REQUEST:
            code, out = 1, '{"cniVersion": "1.1.0", "code": 6, "msg": "network configuration over 1 MiB"}'
        else:
            code, out = call(*parse_request(b"".join(chunks)))
        self.connection.sendall(f"{code}\n{out}\n".encode() if out else f"{code}\n".encode())


class ForwardServer(BoundedConnections, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    max_connections = MAX_CONNECTIONS

    def __init__(self, path: str) -> None:
        umask = os.umask(0o077)  # root's only: whoever writes here sets up pods
        try:
            if os.path.exists(path):
                os.unlink(path)
            super().__init__(path, _Handler)
        finally:
            os.umask(umask)
        self.bound()


def serve(api_socket: str) -> ForwardServer:
    """Listen on `cni.sock` beside the API socket, on a thread of its own."""
    path = os.path.join(os.path.dirname(api_socket), "cni.sock")
    server = ForwardServer(path)
    threading.Thread(target=server.serve_forever, name="cni-forward", daemon=True).start()
    log.info("CNI forwarding socket", path=path)
    return server
