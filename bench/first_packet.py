"""First-packet cost vs number of services, per mode: new connection + request to the last-defined service
at 1 / 1,000 / 10,000 services (iptables: the service whose rule is last in NODED-SERVICES, the longest
chain walk), next to the same server addressed directly in the same interleaved run.

Each mode programs a netns of its own (the test suite's environments); the client is a process in that
netns and cgroup, so the socket hooks or the nat OUTPUT chain see it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, pct, table
from bench.control_plane import ENVS, vip
from tests.bpf.conftest import LINK_ADDRESS, open_env, unique_tag
from tests.objects import endpoint, service, slice_

PORT = 9001
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conn_client.py")


def measure(mode: str, n: int, rounds: int, per_round: int) -> dict:
    env = open_env(ENVS[mode], f"fp-{unique_tag()}")
    try:
        env.echo(PORT, "a")
        for i in range(n):
            env.model.upsert(service(f"s{i}", vip(i)))
            env.model.upsert(slice_(f"s{i}", [endpoint(LINK_ADDRESS)], ports=[{"name": "http", "port": PORT}]))
        env.proxier.sync(full=True)
        target = vip(n - 1)
        if mode == "iptables":
            target = re.findall(r"^-A NODED-SERVICES -d (\S+)/32", env.proxier.tools.save(4, "nat"), re.M)[-1]
        targets = {"vip": [target, 80], "direct": [LINK_ADDRESS, PORT]}
        out = env.python(
            f"import runpy, sys; sys.argv = ['c', {json.dumps(json.dumps(targets))}, '{rounds}', '{per_round}'];"
            f" runpy.run_path({CLIENT!r}, run_name='__main__')"
        )
        data = json.loads(out)
        return {k: data[k]["new"] for k in targets}
    finally:
        env.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,1000,10000")
    p.add_argument("--modes", default="ebpf,nftables,iptables")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=300)
    a = p.parse_args()
    rows = []
    for mode in a.modes.split(","):
        base = None
        for n in [int(x) for x in a.sizes.split(",")]:
            r = measure(mode, n, a.rounds, a.per_round)
            v, d = median(r["vip"]) * 1e6, median(r["direct"]) * 1e6
            base = base or v
            rows.append(
                [mode, n, f"{v:.0f}", f"{pct(r['vip'], 99) * 1e6:.0f}", f"{d:.0f}", f"{v / d:.3f}", f"{v / base:.3f}"]
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        table(
            f"first-packet cost: new connection + request to the last service, {a.rounds} x {a.per_round} per point",
            ["mode", "services", "VIP p50 us", "VIP p99 us", "direct p50 us", "VIP/direct", "vs 1 service"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
