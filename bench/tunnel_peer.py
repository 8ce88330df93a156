"""Both ends of bench/tunnel.py's traffic, run inside lab pods.

server PORT: for each connection, a first byte `B` (bulk: read to EOF, answer the byte count) or `R`
(requests: answer every 64-byte request with 64 bytes). client: `bulk HOST PORT MIB`, `kept HOST PORT N`
(N requests on one connection), `new HOST PORT N` (N connections of one request each); prints JSON.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

SIZE = 64


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return buf


def serve(port: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(512)
    print("serving", flush=True)

    def handle(c: socket.socket) -> None:
        with c:
            mode = c.recv(1)
            if mode == b"B":
                total = 0
                while data := c.recv(1 << 20):
                    total += len(data)
                c.sendall(total.to_bytes(8, "big"))
            elif mode == b"R":
                try:
                    while True:
                        c.sendall(recv_exactly(c, SIZE))
                except ConnectionError:
                    pass

    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def main() -> None:
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
        return
    mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "bulk":
        chunk = b"x" * (1 << 20)
        s = socket.create_connection((host, port))
        start = time.perf_counter()
        s.sendall(b"B")
        for _ in range(n):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        got = int.from_bytes(recv_exactly(s, 8), "big")
        took = time.perf_counter() - start
        print(json.dumps({"mib_s": got / took / (1 << 20), "bytes": got}))
        return
    req = b"r" * SIZE
    lat = []
    if mode == "kept":
        s = socket.create_connection((host, port))
        s.sendall(b"R")
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(req)
            recv_exactly(s, SIZE)
            lat.append(time.perf_counter() - t)
    else:
        for _ in range(n):
            t = time.perf_counter()
            with socket.create_connection((host, port)) as s:
                s.sendall(b"R" + req)
                recv_exactly(s, SIZE)
            lat.append(time.perf_counter() - t)
    lat.sort()
    print(json.dumps({"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}))


if __name__ == "__main__":
    main()
