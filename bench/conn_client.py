"""Runs inside a lab pod: new-connection rate and request latency to targets.

Rounds are interleaved so that drift hits every target alike.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def new_connections(host: str, port: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with socket.create_connection((host, port)) as s:
            s.sendall(b"x\n")
            s.recv(64)
        out.append(time.perf_counter() - t)
    return out


def kept_alive(host: str, port: int, n: int) -> list[float]:
    out = []
    with socket.create_connection((host, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"x\n")
            s.recv(64)
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    targets = json.loads(sys.argv[1])  # {"label": [host, port]}
    rounds, n = int(sys.argv[2]), int(sys.argv[3])
    results: dict[str, dict[str, list[float]]] = {k: {"new": [], "kept": []} for k in targets}
    for _ in range(rounds):
        for label, (host, port) in targets.items():
            results[label]["new"] += new_connections(host, port, n)
            results[label]["kept"] += kept_alive(host, port, n)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
