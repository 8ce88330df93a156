"""DNS side by side: noded (userspace resolver, and its eBPF fast path) vs unbound, dnsmasq and
knot-resolver serving the same names, measured with dnsperf.

A node netns holds the servers on 169.254.20.10 and a bridge; dnsperf runs in a pod netns behind the
bridge, as a pod's queries would come. Each server is pinned to CPU 0 and dnsperf to CPU 1, and RPS on the
node side of the veth puts the node's receive processing on CPU 0 too: there the fast path runs (it has no
process of its own) and the servers' packets are handled. Query files: N cluster names
(`svc-i.default.svc.cluster.local A`, local data for the peers) and N external names
(`ext-i.example.org A`, forwarded by everyone to one dnsmasq upstream on the node's loopback, warmed into
each cache first). QPS from a `dnsperf -c 4 -l SECONDS` run; p50/p99 latency from a second, verbose run
of 3 s at saturation (each server at its own rate: one that drops queries keeps fewer in flight, which
flatters its latency), and p99 from a third at one offered rate for every server (`--rate`). Memory: each
server's RSS with 1,000 and with 10,000 services once answering, per 1,000; for noded also less the service
model it holds for the proxiers anyway (its RSS printed before any DNS structure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import pct, rss_mib, table
from noded.bpf import sock_lb
from noded.lab import netns

NODE, POD = "noded-bench-dnsnode", "noded-bench-dnspod"
LISTEN = "169.254.20.10"  # --address 10.96.0.10: the cluster DNS ClusterIP pods' resolv.conf names instead
UPSTREAM = ("127.0.0.2", 5300)
BPFFS = "/sys/fs/bpf/noded/bench-dns"
BRIDGE = "br-dns"


def sh(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(netns.nsenter_argv(ns, argv), check=True, capture_output=True, text=True, **kw)


def setup() -> None:
    teardown()
    netns.create(NODE)
    netns.create(POD)
    netns.add_bridge(NODE, BRIDGE)
    netns.set_address(NODE, BRIDGE, "10.244.50.1", 24)
    netns.connect_to_bridge(NODE, BRIDGE, "veth-bench", POD, "eth0")
    netns.set_address(POD, "eth0", "10.244.50.2", 24)
    netns.add_route(POD, "0.0.0.0/0", "10.244.50.1")
    sh(NODE, ["ip", "addr", "add", f"{LISTEN}/32", "dev", "lo"])
    # the node's receive work (bridge, tc, the servers' sockets) on CPU 0 with the servers, not on the
    # sending CPU: RPS on the node side of the pod's veth (this netns's own sysfs, through ip netns exec)
    subprocess.run(
        ["ip", "netns", "exec", NODE, "sh", "-c", "echo 1 > /sys/class/net/veth-bench/queues/rx-0/rps_cpus"],
        check=True,
    )
    sh(NODE, ["ip", "addr", "add", f"{UPSTREAM[0]}/8", "dev", "lo"])


def teardown() -> None:
    for ns in (POD, NODE):
        if netns.exists(ns):
            netns.remove(ns)
    sock_lb.remove(BPFFS)


def names(n: int, kind: str) -> list[str]:
    return [f"svc-{i}.default.svc.cluster.local" if kind == "cluster" else f"ext-{i}.example.org" for i in range(n)]


def cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def ext_ip(i: int) -> str:
    return f"192.0.{2 + i // 250}.{i % 250 + 1}"


class Server:
    def __init__(self, name: str, argv: list[str], ready: str | None = None, cpu: int = 0) -> None:
        self.name = name
        full = netns.nsenter_argv(NODE, ["taskset", "-c", str(cpu), *argv])
        self.proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.model_rss: float | None = None  # noded: MiB with the model alone, before any DNS structure
        try:
            if ready:
                deadline = time.monotonic() + 120
                for line in self.proc.stdout:
                    if line.startswith("model-rss-kib="):
                        self.model_rss = int(line.split("=")[1]) / 1024
                    if ready in line:
                        break
                    assert time.monotonic() < deadline, f"{name} never became ready"
            wait_answering(name)
        except BaseException:
            self.stop()  # a server that never answered is not left running
            raise

    def rss(self) -> float:
        # the nsenter'd child: the process tree's largest RSS is the server's
        pids = [self.proc.pid, *children(self.proc.pid)]
        return max(rss_mib(p) for p in pids)

    def stop(self) -> None:
        for pid in children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.proc.kill()
        self.proc.wait()


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in children(k)]


def wait_answering(name: str) -> None:
    code = (
        "import dns.message, dns.query, sys\n"
        "q = dns.message.make_query('svc-0.default.svc.cluster.local', 'A')\n"
        f"r = dns.query.udp(q, '{LISTEN}', timeout=1)\n"
        "sys.exit(0 if r.answer else 1)"
    )
    deadline = time.monotonic() + 60
    while subprocess.run(netns.nsenter_argv(POD, [sys.executable, "-c", code]), capture_output=True).returncode:
        assert time.monotonic() < deadline, f"{name} does not answer"
        time.sleep(0.2)


def write_hosts(path: str, entries: list[tuple[str, str]]) -> str:
    with open(path, "w") as f:
        f.writelines(f"{ip} {name}\n" for ip, name in entries)
    return path


def dnsmasq_argv(hosts: str, address: str, port: int, pid_file: str, *extra: str) -> list[str]:
    return [
        "dnsmasq",
        "-k",
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts}",
        f"--listen-address={address}",
        f"--port={port}",
        "--bind-interfaces",
        "--user=root",
        f"--pid-file={pid_file}",
        *extra,
    ]


def upstream(tmp: str, n: int) -> subprocess.Popen:
    hosts = write_hosts(os.path.join(tmp, "upstream.hosts"), [(ext_ip(i), f"ext-{i}.example.org") for i in range(n)])
    argv = dnsmasq_argv(hosts, UPSTREAM[0], UPSTREAM[1], f"{tmp}/up.pid", "--cache-size=0", "--local-ttl=300")
    return subprocess.Popen(netns.nsenter_argv(NODE, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_unbound(tmp: str, n: int) -> Server:
    conf = os.path.join(tmp, "unbound.conf")
    with open(conf, "w") as f:
        f.write(
            "server:\n  num-threads: 1\n  interface: " + LISTEN + "\n  access-control: 0.0.0.0/0 allow\n"
            '  do-not-query-localhost: no\n  chroot: ""\n  username: ""\n  use-syslog: no\n  logfile: ""\n'
            '  pidfile: ""\n  msg-cache-size: 64m\n  rrset-cache-size: 64m\n  so-reuseport: no\n'
            '  local-zone: "cluster.local." static\n'
        )
        f.writelines(f'  local-data: "svc-{i}.default.svc.cluster.local. 5 IN A {cluster_ip(i)}"\n' for i in range(n))
        f.write(f'forward-zone:\n  name: "example.org."\n  forward-addr: {UPSTREAM[0]}@{UPSTREAM[1]}\n')
    return Server("unbound", ["unbound", "-d", "-c", conf])


def cluster_hosts(tmp: str, n: int) -> str:
    entries = [(cluster_ip(i), f"svc-{i}.default.svc.cluster.local") for i in range(n)]
    return write_hosts(os.path.join(tmp, "cluster.hosts"), entries)


def start_dnsmasq(tmp: str, n: int) -> Server:
    extra = ("--cache-size=10000", "--local-ttl=5", f"--server=/example.org/{UPSTREAM[0]}#{UPSTREAM[1]}")
    return Server(
        "dnsmasq", dnsmasq_argv(cluster_hosts(tmp, n), LISTEN, 53, f"{tmp}/dm.pid", *extra, "--dns-forward-max=1000")
    )


def start_kresd(tmp: str, n: int) -> Server | None:
    if not shutil.which("kresd"):
        return None
    hosts = cluster_hosts(tmp, n)
    conf = os.path.join(tmp, "kresd.conf")
    with open(conf, "w") as f:
        f.write(
            f"net.listen('{LISTEN}', 53, {{ kind = 'dns' }})\n"
            "modules = { 'hints > iterate' }\n"
            "policy.special_names = {}\n"  # else .local is answered NXDOMAIN (RFC 6762) before the hints
            f"hints.add_hosts('{hosts}')\nhints.ttl(5)\n"
            f"policy.add(policy.suffix(policy.STUB('{UPSTREAM[0]}@{UPSTREAM[1]}'), {{todname('example.org')}}))\n"
            "cache.size = 64 * MB\n"
        )
    rundir = os.path.join(tmp, "kresd")
    os.makedirs(rundir, exist_ok=True)
    try:
        return Server("knot-resolver", ["kresd", "-n", "-c", conf, rundir])
    except AssertionError:
        return None


def start_noded(tmp: str, n: int, fast: bool, metrics: bool = True, name: str = "") -> Server:
    argv = [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "resolver_server.py"),
        "--services",
        str(n),
        "--listen",
        LISTEN,
        "--upstream",
        f"{UPSTREAM[0]}:{UPSTREAM[1]}",
    ]
    if fast:
        argv += ["--fast-path", BPFFS, "--bridge", BRIDGE]
    if not metrics:
        argv.append("--no-metrics")
    name = name or ("noded fast path" if fast else "noded" if metrics else "noded (metrics off)")
    return Server(name, argv, ready="ready")


def enroll_pod(enrolled: bool) -> None:
    """The bench pod as an ambient mesh pod (noded's in-pod capture ruleset, with the cluster DNS address
    served on the node as the daemon sets it: its DNS reaches the node, the rest is captured), or not."""
    from noded.redirect.rules import capture_script, remove_script

    script = capture_script(True, direct_dns=(LISTEN,), cluster_dns=(LISTEN,)) if enrolled else remove_script()
    subprocess.run(netns.nsenter_argv(POD, ["nft", "-f", "-"]), input=script, text=True, check=True)


def dnsperf(qfile: str, seconds: int, verbose: bool = False, rate: int = 0) -> dict:
    argv = ["taskset", "-c", "1", "dnsperf", "-s", LISTEN, "-d", qfile, "-c", "4", "-l", str(seconds), "-q", "500"]
    if verbose:
        argv.append("-v")
    if rate:
        argv += ["-Q", str(rate)]
    out = sh(POD, argv, timeout=seconds + 60).stdout
    result = {}
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    result["qps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Queries lost:\s+(\d+)", out)
    result["lost"] = int(m.group(1)) if m else -1
    m = re.search(r"Response codes:\s+(.*)", out)
    result["rcodes"] = m.group(1).strip() if m else ""
    if verbose:
        lat = [float(x) for x in re.findall(r"^> \S+ .* ([\d.]+)$", out, re.M)]
        result["p50"] = pct(lat, 50) * 1e6 if lat else 0
        result["p99"] = pct(lat, 99) * 1e6 if lat else 0
    return result


def measure(server: Server, files: dict[str, str], seconds: int, rate: int) -> dict:
    """QPS at saturation; latency at saturation (each server at its own rate, where a server that drops
    queries runs with fewer in flight) and at one offered rate for all (`rate` QPS), the fair comparison."""
    out = {"rss": server.rss()}  # as the larger run's is taken: started and answering, before the load
    for kind, qfile in files.items():
        if kind == "external":
            dnsperf(qfile, 2)  # warm the cache
        loaded = dnsperf(qfile, seconds)
        verbose = dnsperf(qfile, 3, verbose=True)
        paced = dnsperf(qfile, 3, verbose=True, rate=rate)
        out[kind] = {**loaded, "p50": verbose["p50"], "p99": verbose["p99"], "paced_p99": paced["p99"]}
    return out


def main() -> None:
    global LISTEN
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=50_000, help="the offered QPS of the equal-load latency run")
    parser.add_argument("--servers", default="noded,noded-fast,noded-fast-enrolled,unbound,dnsmasq,kresd")
    parser.add_argument(
        "--address", default=LISTEN, help="where every server listens and dnsperf asks (e.g. the cluster DNS IP)"
    )
    args = parser.parse_args()
    LISTEN = args.address
    tmp = tempfile.mkdtemp(prefix="noded-bench-dns-")
    setup()
    up = None
    try:
        up = upstream(tmp, args.names)
        files = {}
        for kind in ("cluster", "external"):
            files[kind] = os.path.join(tmp, f"{kind}.queries")
            with open(files[kind], "w") as f:
                f.writelines(f"{name} A\n" for name in names(args.names, kind))
        starters = {
            "noded": lambda n: start_noded(tmp, n, False),
            "noded-fast": lambda n: start_noded(tmp, n, True),
            "noded-fast-enrolled": lambda n: start_noded(tmp, n, True, name="noded fast path, enrolled pod"),
            "noded-nometrics": lambda n: start_noded(tmp, n, False, metrics=False),
            "unbound": lambda n: start_unbound(tmp, n),
            "dnsmasq": lambda n: start_dnsmasq(tmp, n),
            "kresd": lambda n: start_kresd(tmp, n),
        }
        rows, mem_rows = [], []
        for key in args.servers.split(","):
            server = starters[key](args.names)
            if server is None:
                rows.append([key, "did not start", *[""] * 8])
                continue
            try:
                if key == "noded-fast-enrolled":
                    enroll_pod(True)
                r = measure(server, files, args.seconds, args.rate)
            finally:
                server.stop()
                if key == "noded-fast-enrolled":
                    enroll_pod(False)
            rows.append(
                [
                    server.name,
                    f"{r['cluster']['qps']:,.0f}",
                    f"{r['cluster']['p50']:.0f}",
                    f"{r['cluster']['p99']:.0f}",
                    f"{r['cluster']['paced_p99']:.0f}",
                    f"{r['external']['qps']:,.0f}",
                    f"{r['external']['p50']:.0f}",
                    f"{r['external']['p99']:.0f}",
                    f"{r['external']['paced_p99']:.0f}",
                    f"{r['cluster']['lost']}/{r['external']['lost']}",
                ]
            )
            if key not in ("noded-fast", "noded-fast-enrolled", "noded-nometrics"):
                big = starters[key](10 * args.names)
                try:
                    rss_big = big.rss()
                finally:
                    big.stop()
                    big_model = big.model_rss
                per_k = (rss_big - r["rss"]) / 9 * 1000 / args.names
                row = [server.name, f"{r['rss']:.1f}", f"{rss_big:.1f}", f"{per_k * 1024:.0f}", "-"]
                if server.model_rss is not None and big_model is not None:  # noded: less the shared model
                    own = ((rss_big - big_model) - (r["rss"] - server.model_rss)) / 9 * 1000 / args.names
                    row[4] = f"{own * 1024:.0f}"
                mem_rows.append(row)
            if key in ("noded-fast", "noded-fast-enrolled"):
                sock_lb.remove(BPFFS)
        print(
            table(
                f"DNS, {args.names} names, dnsperf -c 4 -l {args.seconds} (server on CPU 0, dnsperf on CPU 1)",
                [
                    "server",
                    "cluster QPS",
                    "p50 us",
                    "p99 us",
                    f"p99 us at {args.rate:,} QPS",
                    "cached ext QPS",
                    "p50 us",
                    "p99 us",
                    f"p99 us at {args.rate:,} QPS",
                    "lost",
                ],
                rows,
            )
        )
        print()
        print(
            table(
                "DNS server memory (RSS)",
                [
                    "server",
                    f"{args.names} svc MiB",
                    f"{10 * args.names} svc MiB",
                    "KiB per 1,000 svc",
                    "of it DNS's own (less the model the proxiers hold)",
                ],
                mem_rows,
            )
        )
    finally:
        if up is not None:
            up.kill()
        teardown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
