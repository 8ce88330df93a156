"""A lab client: opens connections or sends datagrams to an address and reports, as JSON, who answered."""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections import Counter


def tcp(host: str, port: int, count: int, timeout: float, message: str = "hello") -> dict:
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    peers: set[str] = set()
    start = time.perf_counter()
    for _ in range(count):
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                peers.add("{}:{}".format(*s.getpeername()[:2]))
                s.sendall(f"{message}\n".encode())
                answers[s.makefile().readline().strip()] += 1
        except OSError as e:
            errors[e.strerror or str(e)] += 1
    return {
        "answers": dict(answers),
        "errors": dict(errors),
        "peers": sorted(peers),
        "seconds": round(time.perf_counter() - start, 4),
    }


def udp(host: str, port: int, count: int, timeout: float, message: str = "hello") -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    answers: Counter[str] = Counter()
    sources: set[str] = set()
    errors: Counter[str] = Counter()
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(count):
            try:
                s.sendto(message.encode(), (host, port))
                data, src = s.recvfrom(2048)
                answers[data.decode().strip()] += 1
                sources.add("{}:{}".format(*src[:2]))
            except OSError as e:
                errors[e.strerror or str(e)] += 1
    return {"answers": dict(answers), "errors": dict(errors), "sources": sorted(sources)}


def hold(host: str, port: int, seconds: float, interval: float) -> dict:
    """One long-lived connection, a request every interval: did it survive?"""
    replies, failures = 0, []
    with socket.create_connection((host, port), timeout=5) as s:
        f = s.makefile()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                s.sendall(b"ping\n")
                if f.readline().strip():
                    replies += 1
                else:
                    failures.append("closed")
                    break
            except OSError as e:
                failures.append(str(e))
                break
            time.sleep(interval)
    return {"replies": replies, "failures": failures}


def follow(host: str, port: int, seconds: float, interval: float, timeout: float) -> None:
    """One connected UDP socket, as glibc's resolver and most UDP clients hold: a datagram every interval,
    one JSON line per answer or error (with the wall-clock time), connecting again after an error as such
    clients do. Shows whether a connected socket follows its service's endpoints."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + seconds
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        while time.monotonic() < deadline:
            event: dict = {"t": time.time()}
            try:
                s.send(b"hello")
                event["answer"] = s.recv(2048).decode().strip()
            except TimeoutError:
                event["error"] = "timeout"
            except OSError as e:
                event["error"] = e.strerror or str(e)
                try:
                    s.connect((host, port))  # a fresh destination, as a client whose socket failed does
                except OSError as e2:
                    event["reconnect"] = e2.strerror or str(e2)
            print(json.dumps(event), flush=True)
            time.sleep(interval)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["tcp", "udp", "hold", "follow"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--message", default="hello", help="what to send; `peer` asks the echo server who it saw")
    a = p.parse_args()
    if a.mode == "tcp":
        out = tcp(a.host, a.port, a.count, a.timeout, a.message)
    elif a.mode == "udp":
        out = udp(a.host, a.port, a.count, a.timeout, a.message)
    elif a.mode == "follow":
        follow(a.host, a.port, a.seconds, a.interval, a.timeout)
        return
    else:
        out = hold(a.host, a.port, a.seconds, a.interval)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
