"""The node tunnel against direct pod-to-pod TCP, across two lab nodes: bulk throughput and request latency
(kept-alive and new connections). Two pairs of pods in one lab, node1 -> node2: a plain pair (no
capture beyond DNS) and an enrolled pair (HBONE: outbound 15001 -> mTLS HTTP/2 CONNECT -> 15008 -> app).
Prints the table and the tunnel/direct ratios, and what bulk costs the machine: busy core-seconds per GiB
moved (every process and the kernel's network work, from /proc/stat) and the kernel's share of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_jiffies, table
from noded.lab.lab import Lab
from noded.lab.workloads import node_status

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tunnel_peer.py")
PORT = 9000


def run(lab: Lab, pod: str, *args: object) -> dict:
    res = lab.run(pod, [sys.executable, PEER, *map(str, args)], timeout=600)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return json.loads(res.stdout)


def bulk(lab: Lab, client: str, ip: str, mib: int) -> dict:
    """Bulk throughput, and what it cost the machine: core-seconds per GiB moved (busy CPU of both cores,
    every process and the kernel's network work) and the kernel's share of them."""
    hz = os.sysconf("SC_CLK_TCK")
    busy0, kernel0 = cpu_jiffies()
    result = run(lab, client, "bulk", ip, PORT, mib)
    busy1, kernel1 = cpu_jiffies()
    gib = result["bytes"] / (1 << 30)
    busy = busy1 - busy0
    return {**result, "cpu_s_per_gib": busy / hz / gib, "kernel_share": (kernel1 - kernel0) / busy}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args()
    lab = Lab()
    lab.up(2, "ebpf")
    servers = []
    try:
        pairs = {
            "direct": ("default/pclient", "default/pserver", {}),
            "tunnel": ("default/mclient", "default/mserver", AMBIENT),
        }
        for client, server, labels in pairs.values():
            lab.add_pod(client, "node1", labels)
            lab.add_pod(server, "node2", labels)
            proc = lab.popen(server, [sys.executable, PEER, "server", str(PORT)], stdout=subprocess.PIPE, text=True)
            assert "serving" in proc.stdout.readline()
            servers.append(proc)
        deadline = time.monotonic() + 30
        while not all(node_status(lab, n)["tunnel"]["certificates"] for n in ("node1", "node2")):
            assert time.monotonic() < deadline, "no certificates"
            time.sleep(0.2)
        results = {}
        for name, (client, server, _labels) in pairs.items():
            ip = lab.state()["pods"][server]["ips"][0]
            run(lab, client, "kept", ip, PORT, 100)  # warm up
            results[name] = {
                "bulk": bulk(lab, client, ip, args.mib),
                "kept": run(lab, client, "kept", ip, PORT, args.requests),
                "new": run(lab, client, "new", ip, PORT, args.connections),
            }
        counts = node_status(lab, "node1")["tunnel"]
        assert counts["hbone_out"] >= args.connections, counts  # the tunnel pair really went through HBONE
        d, t = results["direct"], results["tunnel"]
        db, tb = d["bulk"], t["bulk"]
        rows = [
            ["bulk throughput MiB/s", f"{db['mib_s']:.0f}", f"{tb['mib_s']:.0f}", f"{tb['mib_s'] / db['mib_s']:.2f}x"],
            [
                "bulk CPU core-s per GiB",
                f"{db['cpu_s_per_gib']:.2f}",
                f"{tb['cpu_s_per_gib']:.2f}",
                f"{tb['cpu_s_per_gib'] / db['cpu_s_per_gib']:.2f}x",
            ],
            ["bulk CPU in the kernel", f"{db['kernel_share']:.0%}", f"{tb['kernel_share']:.0%}", ""],
        ]
        for kind, label in (("kept", "kept-alive request"), ("new", "new connection + request")):
            for q in ("p50_us", "p99_us"):
                rows.append(
                    [
                        f"{label} {q[:3]} us",
                        f"{d[kind][q]:.0f}",
                        f"{t[kind][q]:.0f}",
                        f"+{(t[kind][q] - d[kind][q]) / 1000:.2f} ms",
                    ]
                )
        print(
            table(
                f"Node tunnel vs direct, node1 -> node2 ({args.mib} MiB bulk, {args.requests} requests, "
                f"{args.connections} connections)",
                ["measure", "direct", "tunnel", "tunnel vs direct"],
                rows,
            )
        )
    finally:
        for s in servers:
            s.kill()
        lab.down()


if __name__ == "__main__":
    main()
