"""The waypoint side by side with haproxy as the L7 hop, on the same path, in one run.

A 2-node lab (eBPF mode): `client` (node1) and `echo` (node2) are mesh pods; echo runs the lab's HTTP echo on
8080 and Debian's haproxy (HTTP mode, `unique-id-header X-Request-Id`) on 8081 in its own netns, forwarding
to 127.0.0.1:8080. Three Services, all reached from client over today's L4 tunnel (HBONE, mTLS):
- `echo-l4` (`istio.io/use-waypoint: none`): the L4 tunnel alone, the baseline;
- `echo-l7`: through noded's waypoint (on node2, the endpoint's node), then the app;
- `echo-haproxy` (`none`, port 8081): the L4 tunnel, then haproxy in the pod, then the app.
wrk in the client pod: latency from one connection making requests back to back (kept alive, and a new
connection per request), p50/p99 added over the baseline; throughput from 16 connections, with the CPU
seconds of the processes doing the L7 work (noded on node2 for the waypoint, less what the same requests
cost it on the L4 path; haproxy itself) giving requests per busy core of the L7 hop. Then memory per idle
kept-alive connection through the waypoint: node2's (and node1's) noded RSS before and after 2,000 idle
connections that made one request each, less the same through the L4 path.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import rss_mib, table
from noded.lab.lab import Lab
from noded.lab.mesh_demo import AMBIENT, _apply, _wait
from noded.lab.workloads import node_status, service_yaml, start_http_echo, wait_programmed

HAPROXY_CFG = """
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend l7
    bind :::8081 v4v6
    unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
    unique-id-header X-Request-Id
    default_backend app
backend app
    http-reuse always
    server app 127.0.0.1:8080
"""

IDLE = """
import socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.create_connection((host, 80), timeout=10)
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n")
    got = b""
    while b"}" not in got:
        got += s.recv(4096)
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(lab: Lab, url: str, seconds: int, connections: int, close: bool = False) -> dict:
    argv = ["wrk", "-t1" if connections == 1 else "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    res = lab.run("default/client", argv, timeout=seconds + 60)
    out = res.stdout
    if res.returncode != 0:
        raise RuntimeError(res.stderr or out)
    lat = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    if not rps:
        raise RuntimeError(f"wrk {url}: no request answered\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "p50": lat.get("50"),
        "p99": lat.get("99"),
        "rps": rps,
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def _ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group(0))
    unit = text[len(str(re.match(r"[\d.]+", text).group(0))) :]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}.get(unit, 1.0)


def setup(lab: Lab) -> tuple[list, dict[str, str], int]:
    _apply(
        lab,
        [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "default", "labels": {**AMBIENT, "istio.io/use-waypoint": "waypoint"}},
            },
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "default"},
                "spec": {"gatewayClassName": "istio-waypoint"},
            },
        ],
    )
    lab.add_pod("default/client", "node1", {"app": "client"}, service_account="client")
    lab.add_pod("default/echo", "node2", {"app": "echo"}, service_account="echo")
    procs = [start_http_echo(lab, "default/echo")]
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg:
        cfg.write(HAPROXY_CFG)
    haproxy = lab.popen("default/echo", ["haproxy", "-f", cfg.name, "-db"], stdout=subprocess.DEVNULL)
    procs.append(haproxy)
    docs = []
    for name, port, target, labels in (
        ("echo-l4", 80, 8080, {"istio.io/use-waypoint": "none"}),
        ("echo-l7", 80, 8080, {}),
        ("echo-haproxy", 80, 8081, {"istio.io/use-waypoint": "none"}),
    ):
        doc = yaml.safe_load(service_yaml(name, {"app": "echo"}, [("http", "TCP", port, target)]))
        doc["metadata"]["labels"] = labels
        docs.append(doc)
    _apply(lab, docs)
    vips = {d["metadata"]["name"]: lab.state()["clusterIPs"][f"default/{d['metadata']['name']}"] for d in docs}
    for vip in vips.values():
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1, timeout=30)
    for node, ids in (("node1", ["sa/client"]), ("node2", ["sa/echo", "sa/waypoint"])):
        _wait(
            f"certificates on {node}",
            lambda n=node, i=ids: all(
                any(x in c["identity"] for c in node_status(lab, n)["tunnel"]["certificates"]) for x in i
            ),
        )
    return procs, vips, haproxy.pid


def idle_memory(lab: Lab, vip: str, count: int) -> dict[str, float]:
    """KiB of RSS per idle kept-alive connection, on each node's noded."""
    pids = {n: lab.daemon_pid(n) for n in ("node1", "node2")}
    before = {n: rss_mib(p) for n, p in pids.items()}
    proc = lab.popen(
        "default/client",
        [sys.executable, "-c", IDLE, vip, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if "open" not in line:
        proc.kill()
        raise RuntimeError(f"idle connections: {line}")
    time.sleep(1.0)
    after = {n: rss_mib(p) for n, p in pids.items()}
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(30)
    time.sleep(2.0)
    return {n: (after[n] - before[n]) * 1024 / count for n in pids}


def parser_cost() -> list[list[object]]:
    import timeit

    import httptools

    req = (
        b"GET /echo/path?x=1 HTTP/1.1\r\nHost: echo.default.svc.cluster.local\r\nUser-Agent: curl/8.5\r\n"
        b"Accept: */*\r\nX-Request-Id: 1b4e28ba-2fa1-11d2-883f-0016d3cca427\r\n\r\n"
    )

    class Sink:
        def on_header(self, name, value):
            pass

    n = 20000
    rows = [
        [
            "httptools (llhttp)",
            f"{timeit.timeit(lambda: httptools.HttpRequestParser(Sink()).feed_data(req), number=n) / n * 1e6:.2f}",
        ]
    ]
    try:
        import h11

        def h11_parse():
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(req)
            conn.next_event()

        rows.append(["h11", f"{timeit.timeit(h11_parse, number=n) / n * 1e6:.2f}"])
    except ImportError:
        rows.append(["h11", "not installed"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--idle", type=int, default=2000)
    args = parser.parse_args()
    print(table("HTTP request parse cost (one 5-header GET)", ["parser", "us per request"], parser_cost()))
    lab = Lab()
    if lab.is_up:
        raise SystemExit("a lab is up: `noded lab down` first")
    lab.up(2, "ebpf")
    procs = []
    try:
        procs, vips, haproxy_pid = setup(lab)
        noded2 = lab.daemon_pid("node2")
        results = {}
        for name in ("echo-l4", "echo-l7", "echo-haproxy"):
            url = f"http://{vips[name]}/"
            wrk(lab, url, 2, 4)  # warm: connections, certificates, pools
            kept = wrk(lab, url, args.seconds, 1)
            fresh = wrk(lab, url, args.seconds, 1, close=True)
            cpu_before = {"noded2": cpu_seconds(noded2), "haproxy": cpu_seconds(haproxy_pid)}
            busy = wrk(lab, url, args.seconds, 16)
            cpu = {k: cpu_seconds(noded2 if k == "noded2" else haproxy_pid) - v for k, v in cpu_before.items()}
            requests = busy["rps"] * args.seconds
            results[name] = {
                "kept": kept,
                "fresh": fresh,
                "busy": busy,
                "cpu_per_request": {k: v / requests for k, v in cpu.items()},
            }
        base = results["echo-l4"]
        rows = []
        for name, label in (
            ("echo-l4", "L4 tunnel only (baseline)"),
            ("echo-l7", "noded waypoint"),
            ("echo-haproxy", "haproxy"),
        ):
            r = results[name]
            added = (
                ""
                if name == "echo-l4"
                else (f"+{r['kept']['p50'] - base['kept']['p50']:.3f} / +{r['kept']['p99'] - base['kept']['p99']:.3f}")
            )
            added_new = (
                ""
                if name == "echo-l4"
                else (
                    f"+{r['fresh']['p50'] - base['fresh']['p50']:.3f} / +{r['fresh']['p99'] - base['fresh']['p99']:.3f}"
                )
            )
            rows.append(
                [
                    label,
                    f"{r['kept']['p50']:.3f} / {r['kept']['p99']:.3f}",
                    added,
                    f"{r['fresh']['p50']:.3f} / {r['fresh']['p99']:.3f}",
                    added_new,
                    f"{r['busy']['rps']:,.0f}",
                    r["busy"]["errors"] + r["kept"]["errors"] + r["fresh"]["errors"],
                ]
            )
        print(
            table(
                f"Through the L7 hop, ms (wrk in a pod: 1 connection back to back; 16 for rps; {args.seconds} s each)",
                ["path", "kept-alive p50 / p99", "added", "new conn p50 / p99", "added", "rps (16 conns)", "non-2xx"],
                rows,
            )
        )
        # the L7 hop's own CPU per request: the waypoint's is what noded on node2 spent beyond the L4 path
        waypoint_cpu = results["echo-l7"]["cpu_per_request"]["noded2"] - base["cpu_per_request"]["noded2"]
        haproxy_cpu = results["echo-haproxy"]["cpu_per_request"]["haproxy"]
        per_core = {
            "noded waypoint": 1 / waypoint_cpu if waypoint_cpu > 0 else float("inf"),
            "haproxy": 1 / haproxy_cpu,
        }
        print(
            table(
                "Requests per busy core of the L7 hop (CPU seconds per request of its process)",
                ["L7 hop", "CPU us per request", "requests per core-second", "vs haproxy"],
                [
                    [
                        "noded waypoint (node2's noded, less the L4 path's)",
                        f"{waypoint_cpu * 1e6:.0f}",
                        f"{per_core['noded waypoint']:,.0f}",
                        f"{per_core['noded waypoint'] / per_core['haproxy']:.2f}x",
                    ],
                    ["haproxy", f"{haproxy_cpu * 1e6:.0f}", f"{per_core['haproxy']:,.0f}", "1.00x"],
                ],
            )
        )
        mem_l7 = idle_memory(lab, vips["echo-l7"], args.idle)
        mem_l4 = idle_memory(lab, vips["echo-l4"], args.idle)
        print(
            table(
                f"Memory per idle kept-alive connection ({args.idle} connections, each after one request), KiB",
                ["noded", "through the waypoint", "L4 path", "the waypoint's share"],
                [
                    [n, f"{mem_l7[n]:.1f}", f"{mem_l4[n]:.1f}", f"{mem_l7[n] - mem_l4[n]:.1f}"]
                    for n in ("node1", "node2")
                ],
            )
        )
    finally:
        for p in procs:
            p.kill()
        lab.down()


if __name__ == "__main__":
    main()
