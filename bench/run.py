"""Runs every benchmark and prints their tables (root; uses the lab and real BPF maps)."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

RUNS = (
    ("dataplane.py", []),
    ("control_plane.py", ["--sizes", "1000", "--modes", "ebpf,nftables,iptables,iptables-legacy"]),
    # iptables-nft-restore 1.8.9 is quadratic in user space (3 s at 1,000 services, 35 s at 3,000): at
    # 10,000 only the legacy backend is measured
    ("control_plane.py", ["--sizes", "10000", "--modes", "ebpf,nftables,iptables-legacy", "--changes", "30"]),
    ("first_packet.py", []),
    ("cni_latency.py", []),
    ("resolver.py", []),
    ("tunnel.py", []),
    ("waypoint.py", []),
    ("soak.py", ["--seconds", "180"]),
)
for script, args in RUNS:
    print(f"\n$ bench/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, script), *args], check=True, stderr=subprocess.DEVNULL)
