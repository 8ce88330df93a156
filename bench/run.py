"""Runs every benchmark and prints their tables (root; uses the lab and real BPF maps)."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

for script, args in (("dataplane.py", []), ("control_plane.py", ["--sizes", "1000,10000"])):
    print(f"\n$ bench/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, script), *args], check=True, stderr=subprocess.DEVNULL)
