"""What metrics cost (issue 22): the per-call price of what the hot paths do for /metrics, and DNS QPS with
the per-query metrics on and off side by side (bench/resolver.py's setup: dnsperf from a pod netns,
noded's userspace resolver, the fast path off so every query pays it), in one run.

    python bench/metrics_cost.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from noded.dns.resolver import Client, DnsStats
from noded.metrics import DaemonMetrics
from noded.tunnel.telemetry import TcpTelemetry, Workload


def per_call() -> list[tuple[str, float]]:
    import dns.message

    query = dns.message.make_query("svc-1.default.svc.cluster.local.", "A").to_wire()
    reply = bytes([*query[:2], query[2] | 0x80, *query[3:]])
    stats, metrics, tel = DnsStats(), DaemonMetrics(), TcpTelemetry()
    client = Client(namespace="default")
    key = tel.key("source", Workload("a", "default"), Workload("b", "default"), None, True)
    n = 200_000
    out = []
    for name, fn in (
        ("DNS query: DnsStats.record", lambda: stats.record(0, reply, client, "kubernetes", 0.0001)),
        ("sync: observe_sync (4 histograms, gauge)", lambda: metrics.proxy.observe_sync(0.0002, False, None)),
        ("tunnel connection: open + close", lambda: tel.close(tel.open(key), 100, 10)),
    ):
        out.append((name, timeit.timeit(fn, number=n) / n * 1e6))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each (noise shows)")
    args = parser.parse_args()
    for name, us in per_call():
        print(f"{name:<45} {us:7.2f} µs per call")
    here = os.path.dirname(os.path.abspath(__file__))
    order = ",".join(["noded,noded-nometrics"] * args.rounds)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, os.path.join(here, "resolver.py"), "--servers", order, "--seconds", str(args.seconds)],
        check=True,
    )
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
