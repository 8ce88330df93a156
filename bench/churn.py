"""Churn: EndpointSlice changes at a steady rate on a large cluster while DNS queries run, in one services
mode (`--mode`: eBPF, nftables or legacy iptables).

N services (a tenth of them headless) × 10 endpoints are programmed into a real environment of that mode (a
netns and cgroup of its own: pinned maps, the nft table, the iptables chains), then for `--seconds` one
endpoint of a random service is replaced `--rate` times a second, as a source would hand the changes in,
with the daemon's bounded-frequency runner syncing them (`--min-sync`). Meanwhile a client on loopback asks
the userspace resolver for random service names (headless ones included, whose answers change with the
churn) at a steady rate.

Reported: network programming latency (a change's arrival to the end of the sync that programmed it,
kube-proxy's network_programming_duration), sync durations, and DNS latency p50/p99 in a quiet phase
before the churn and during it (flat is the goal: the zone is updated service by service).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dns.message

from bench.common import pct, table
from bench.control_plane import ENVS
from noded.dns.resolver import Client, Resolver
from noded.dns.server import serve
from noded.dns.upstream import Upstreams
from noded.loopthread import LoopThread
from noded.runner import BoundedFrequencyRunner
from tests.bpf.conftest import open_env, unique_tag
from tests.objects import endpoint, service, slice_

DNS_PORT = 5399


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def endpoints(i: int, gen: int = 0) -> list[dict]:
    return [endpoint(f"172.{16 + j}.{(i // 256) % 256}.{i % 256}") for j in range(9)] + [
        endpoint(f"172.99.{gen // 256 % 256}.{gen % 256}")
    ]


def headless(i: int) -> bool:
    return i % 10 == 0


def dns_client(names: list[str], rate: float, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """Ask for random names at `rate` per second; (when sent, seconds to answer) per query."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", DNS_PORT))
    s.settimeout(2)
    gap = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        q = dns.message.make_query(random.choice(names), "A")
        sent = time.monotonic()
        s.send(q.to_wire())
        try:
            s.recv(65535)
            out.append((sent, time.monotonic() - sent))
        except TimeoutError:
            out.append((sent, 2.0))
        next_at += gap
        time.sleep(max(0.0, next_at - time.monotonic()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="ebpf", choices=["ebpf", "nftables", "iptables-legacy"])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--rate", type=float, default=100.0, help="EndpointSlice changes per second")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--quiet-seconds", type=float, default=10.0, help="DNS alone before the churn")
    p.add_argument("--dns-rate", type=float, default=500.0, help="DNS queries per second")
    p.add_argument("--min-sync", type=float, default=1.0, help="the runner's minimum gap (minSyncPeriod)")
    a = p.parse_args()

    env = open_env(ENVS[a.mode], f"churn-{unique_tag()}")
    if getattr(env, "terminator", None) is not None:  # eBPF: the daemon's default
        env.terminator.tcp = False
    loop = LoopThread("churn-dns")
    try:
        for i in range(a.services):
            env.model.upsert(service(f"s{i}", "None" if headless(i) else vip(i)))
            env.model.upsert(slice_(f"s{i}", endpoints(i)))
        env.proxier.sync(full=True)
        resolver = Resolver(env.model, Upstreams([]), "cluster.local")
        resolver.zone.address_records()  # the index built
        loop.start()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", DNS_PORT))
        udp.setblocking(False)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", DNS_PORT))
        tcp.listen(16)
        tcp.setblocking(False)
        loop.run(serve(udp, tcp, resolver.resolve, lambda _peer: Client()))

        programming: list[float] = []
        durations: list[float] = []

        def sync(full: bool) -> None:
            start = time.monotonic()
            env.proxier.sync(full)
            end = time.monotonic()
            durations.append(end - start)
            if env.proxier.tracker.taken_since is not None:
                programming.append(end - env.proxier.tracker.taken_since)

        runner = BoundedFrequencyRunner("churn", sync, a.min_sync, 3600)
        env.proxier.tracker.wake = runner.run  # as the daemon: the model wakes the runner
        runner.start()
        names = [f"s{i}.default.svc.cluster.local" for i in range(a.services)]
        answers: list[tuple[float, float]] = []
        stop = threading.Event()
        client = threading.Thread(target=dns_client, args=(names, a.dns_rate, stop, answers), daemon=True)
        client.start()
        time.sleep(a.quiet_seconds)
        churn_start = time.monotonic()
        changes, gen, next_at = 0, 0, churn_start
        while time.monotonic() - churn_start < a.seconds:
            i = random.randrange(a.services)
            gen += 1
            env.model.upsert(slice_(f"s{i}", endpoints(i, gen)))
            changes += 1
            next_at += 1.0 / a.rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(a.min_sync + 0.5)
        stop.set()
        client.join(timeout=5)
        runner.stop()
        quiet = [lat for sent, lat in answers if sent < churn_start]
        busy = [lat for sent, lat in answers if sent >= churn_start]
        ms = 1000.0
        rows = [
            ["changes applied", f"{changes} in {a.seconds:.0f} s", ""],
            ["syncs", f"{len(durations)}", f"minSyncPeriod {a.min_sync} s"],
            [
                "network programming p50 / p99",
                f"{pct(programming, 50) * ms:.1f} / {pct(programming, 99) * ms:.1f} ms",
                "a change's arrival to its sync's end",
            ],
            ["sync duration p50 / p99", f"{pct(durations, 50) * ms:.2f} / {pct(durations, 99) * ms:.2f} ms", ""],
            [
                "DNS p50 / p99, quiet",
                f"{pct(quiet, 50) * ms:.2f} / {pct(quiet, 99) * ms:.2f} ms",
                f"{len(quiet)} queries",
            ],
            [
                "DNS p50 / p99, during churn",
                f"{pct(busy, 50) * ms:.2f} / {pct(busy, 99) * ms:.2f} ms",
                f"{len(busy)} queries",
            ],
        ]
        title = (
            f"churn: {a.services} services x 10 endpoints (a tenth headless), {a.mode}, {a.rate:.0f} EndpointSlice"
            f" changes/s for {a.seconds:.0f} s, DNS {a.dns_rate:.0f} q/s on the userspace resolver"
        )
        print(table(title, ["", "measured", ""], rows))
    finally:
        loop.stop()
        env.close()


if __name__ == "__main__":
    main()
