"""Runs every benchmark and prints their tables (root; uses the lab and real BPF maps)."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

RUNS = (
    ("dataplane.py", []),
    ("control_plane.py", ["--sizes", "1000"]),
    # iptables-nft-restore did not finish a 10,000-service full sync in 4 minutes here: left out
    ("control_plane.py", ["--sizes", "10000", "--modes", "ebpf,nftables", "--changes", "30"]),
    ("first_packet.py", []),
)
for script, args in RUNS:
    print(f"\n$ bench/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, script), *args], check=True, stderr=subprocess.DEVNULL)
