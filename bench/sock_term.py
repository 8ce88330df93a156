"""Connected UDP clients following their endpoints, per services mode, and what socket termination costs.

1. In a real 2-node lab per mode: a pod holds a connected UDP socket to a ClusterIP (a datagram every
   10 ms); its endpoint is replaced by one on the other node, 50 times. Reported: time from the manifest
   change to the first answer from the new endpoint, p50/p99 (it includes the manifest directory's pick-up).
2. In-process, eBPF mode at 10,000 services x 10 endpoints with 1,000 live connected UDP sockets spread
   over 100 network namespaces in the cgroup (a node's worth of pods): one EndpointSlice change (an
   endpoint replaced) synced with socket termination on and off, side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, pct, table
from bench.control_plane import endpoints, vip
from noded.bpf.sock_term import SocketTerminator
from noded.lab import netns
from noded.lab.lab import Lab
from noded.lab.workloads import follow_until, start_echo, wait_programmed
from tests.bpf.conftest import LbEnv, open_env, unique_tag
from tests.objects import endpoint, service, slice_

HOLDER = """
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
socks = []
for path, vips in ((a.split("=")[0], a.split("=")[1].split(",")) for a in sys.argv[1:]):
    fd = os.open(path, os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0
    os.close(fd)
    for v in vips:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((v, 80))
        socks.append(s)
print(len(socks), flush=True)
sys.stdin.read()
"""


def lab_trials(mode: str, trials: int) -> list[float]:
    lab = Lab()
    lab.up(2, mode)
    servers = []
    try:
        for pod, node in (("default/a", "node1"), ("default/b", "node2")):
            lab.add_pod(pod, node, {"app": "x"})
            servers.append(start_echo(lab, pod, tcp=8080, udp=5353))
        lab.add_pod("default/client", "node1")
        ips = {p: lab.state()["pods"][f"default/{p}"]["ips"][0] for p in ("a", "b")}
        nodes = {"a": "node1", "b": "node2"}
        ports = [{"name": "u", "port": 5353, "protocol": "UDP"}]
        svc = service("follow", "10.96.200.7", [{"name": "u", "port": 7000, "protocol": "UDP"}])

        def point_to(name: str) -> None:
            docs = [svc, slice_("follow", [endpoint(ips[name], node=nodes[name])], ports=ports)]
            with open(f"{lab.manifests}/follow.yaml.tmp", "w") as f:
                import yaml

                f.write(yaml.safe_dump_all(docs))
            os.rename(f"{lab.manifests}/follow.yaml.tmp", f"{lab.manifests}/follow.yaml")

        point_to("a")
        wait_programmed(lab, "node1", "10.96.200.7:7000/UDP", ready_ips=[ips["a"]])
        argv = [sys.executable, "-m", "noded.lab.probe", "follow", "10.96.200.7", "7000"]
        argv += ["--seconds", str(trials * 3 + 30), "--interval", "0.01", "--timeout", "0.2"]
        follower = lab.popen("default/client", argv, stdout=subprocess.PIPE, text=True)
        delays = []
        current, other = "a", "b"
        try:
            for _ in range(trials):
                follow_until(follower, current, 10)
                point_to(other)
                changed = time.time()
                delays.append((follow_until(follower, other, 10)[0]["t"] - changed) * 1000)
                current, other = other, current
        finally:
            follower.kill()
            follower.wait()
        return delays
    finally:
        for s in servers:
            s.kill()
        lab.down()


UDP_PORT = [{"name": "u", "port": 80, "protocol": "UDP"}]
UDP_TARGET = [{"name": "u", "port": 8080, "protocol": "UDP"}]


def udp_slice(i: int, eps: list[dict]) -> dict:
    return slice_(f"s{i}", eps, ports=UDP_TARGET)


def sync_cost(n: int, m: int, sockets: int, namespaces: int, changes: int) -> tuple[dict[str, list[float]], dict]:
    env = open_env(LbEnv, f"st-{unique_tag()}")
    created: list[str] = []
    sleepers: list[subprocess.Popen] = []
    holder = None
    try:
        for i in range(n):
            env.model.upsert(service(f"s{i}", vip(i), UDP_PORT))
            env.model.upsert(udp_slice(i, endpoints(i, m)))
        env.proxier.sync(full=True)
        per_ns = sockets // namespaces
        args = []
        for k in range(namespaces):
            name = f"noded-test-st{k}-{os.getpid()}"
            netns.create(name)
            created.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
            subprocess.run(["ip", "-n", name, "route", "add", "default", "dev", "lo"], check=True)
            # a process of the pod in the cgroup, as a pod's would be: how noded finds the namespace
            sleepers.append(
                subprocess.Popen(
                    netns.nsenter_argv(name, ["sleep", "3600"]), preexec_fn=lambda: netns.cgroup_join(env.cgroup)
                )
            )
            args.append(f"/run/netns/{name}=" + ",".join(vip((k * per_ns + j) % 100) for j in range(per_ns)))
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: netns.cgroup_join(env.cgroup),
        )
        assert int(holder.stdout.readline()) == per_ns * namespaces
        settings = {
            "off": None,
            "on (UDP, the default)": SocketTerminator(env.bpffs, env.cgroup, tcp=False),
            "on (UDP and TCP)": env.terminator,
        }
        out: dict[str, list[float]] = {name: [] for name in settings}
        for k in range(changes):
            for n_setting, (setting, terminator) in enumerate(settings.items()):
                env.proxier.terminator = terminator
                i = (k * 7 + n_setting) % 100  # the services the sockets hold
                eps = endpoints(i, m)
                eps[k % m] = endpoint(f"172.99.{k // 256 % 256}.{k % 256}")
                env.model.upsert(udp_slice(i, eps))
                start = time.perf_counter()
                env.proxier.sync()
                out[setting].append((time.perf_counter() - start) * 1000)
                env.model.upsert(udp_slice(i, endpoints(i, m)))  # back, for the next round
                env.proxier.sync()
        env.proxier.terminator = env.terminator
        stats = {name: t.stats for name, t in settings.items() if t is not None}
        settings["on (UDP, the default)"].close()
        return out, stats
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for s in sleepers:
            s.kill()
            s.wait()
        for name in created:
            netns.remove(name)
        env.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="ebpf,nftables,iptables")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--changes", type=int, default=100)
    a = p.parse_args()
    rows = []
    for mode in a.modes.split(","):
        d = lab_trials(mode, a.trials)
        rows.append([mode, len(d), f"{median(d):.0f}", f"{pct(d, 99):.0f}", f"{max(d):.0f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    print(
        table(
            "connected UDP client: slice change -> first answer from the new endpoint (ms, lab, 2 nodes)",
            ["mode", "trials", "p50", "p99", "max"],
            rows,
        )
    )
    lat, stats = sync_cost(a.services, 10, a.sockets, a.namespaces, a.changes)
    rows = []
    for name, values in lat.items():
        st = stats.get(name)
        rows.append(
            [
                name,
                len(values),
                f"{median(values):.2f}",
                f"{pct(values, 99):.2f}",
                st.destroyed if st else "-",
                st.namespaces if st else "-",
            ]
        )
    print(
        table(
            f"eBPF sync of one EndpointSlice change (an endpoint replaced) at {a.services} services x 10, "
            f"{a.sockets} connected UDP sockets in {a.namespaces} netns (ms)",
            ["socket termination", "changes", "p50", "p99", "sockets destroyed", "netns visited per run"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
