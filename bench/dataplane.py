"""Dataplane: a pod on node1 to a backend on node2.

Through the service VIP vs straight to the pod IP (the physical limit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, pct, table
from noded.lab.lab import Lab
from noded.lab.workloads import service_yaml, start_echo, wait_programmed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=500)
    a = p.parse_args()
    lab = Lab()
    lab.up(2, "ebpf")
    server = None
    try:
        lab.add_pod("default/backend", "node2", {"app": "backend"})
        server = start_echo(lab, "default/backend", tcp=8080)
        lab.add_pod("default/client", "node1")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(service_yaml("backend", {"app": "backend"}, [("http", "TCP", 80, 8080)]))
        lab.apply(f.name)
        vip = lab.state()["clusterIPs"]["default/backend"]
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1)
        pod_ip = lab.state()["pods"]["default/backend"]["ips"][0]
        targets = {"direct": [pod_ip, 8080], "vip": [vip, 80]}
        res = lab.run(
            "default/client",
            [
                sys.executable,
                os.path.abspath("bench/conn_client.py"),
                json.dumps(targets),
                str(a.rounds),
                str(a.per_round),
            ],
            timeout=1200,
        )
        data = json.loads(res.stdout)
    finally:
        if server:
            server.kill()
        lab.down()
    rows = []
    for kind, what in (("new", "new connection + request"), ("kept", "request on kept-alive connection")):
        d, v = data["direct"][kind], data["vip"][kind]
        rate_d, rate_v = len(d) / sum(d), len(v) / sum(v)
        rows.append(
            [
                what,
                f"{rate_d:,.0f}/s",
                f"{rate_v:,.0f}/s",
                f"{rate_v / rate_d:.3f}",
                f"{median(d) * 1e6:.0f}",
                f"{median(v) * 1e6:.0f}",
                f"{pct(d, 99) * 1e6:.0f}",
                f"{pct(v, 99) * 1e6:.0f}",
            ]
        )
    print(
        table(
            f"dataplane: pod on node1 -> backend pod on node2, {a.rounds} x {a.per_round} interleaved, one run",
            [
                "operation",
                "direct rate",
                "via VIP rate",
                "VIP/direct",
                "direct p50 us",
                "VIP p50 us",
                "direct p99 us",
                "VIP p99 us",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
