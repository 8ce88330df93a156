"""Issue 17's attacker scenarios against a lab node under load, measuring what the node's own users see.

A 2-node lab (eBPF mode, the tunnel on): `default/client` on node1 resolves a service name through the
cluster DNS address and fetches from its VIP, over and over, for the whole run. Meanwhile:

1. self-calls: a pod on node1 (enrolled, and one that is not) connects to its own 127.0.0.1:15001 / :15006;
2. DNS: a pod floods the cluster DNS address with one external question under every ID (the loop detector
   used to set upstreams aside for good) and asks the probe names' zone;
3. HBONE bounds: a mesh peer with a valid certificate (`ns/evil/sa/attacker`, issued by the lab's root),
   from node2, opens connections to an enrolled pod's 15008 on node1 and sends a never-ending header block, 20,000
   open-and-reset streams, and leaves 200 connections idle;
4. HBONE authority: the same peer asks for loopback, the metadata address, a service VIP and a host name.

Reported: the load client's requests and failures, node1's daemon file descriptors and RSS before,
during (peak) and after, and what each attack got.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib

from bench.common import rss_mib, table
from noded.lab.lab import Lab
from noded.lab.workloads import mesh_pods, node_status, service_yaml, wait_programmed

LOAD = """
import json, socket, sys, time
import dns.message, dns.query
vip, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
ok = failed = 0
errors = {}
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), "10.96.0.10", timeout=2)
        assert [a.address for rr in r.answer for a in rr] == [vip], r
        with socket.create_connection((vip, 80), timeout=2) as s:
            s.sendall(b"hello\\n")
            assert s.makefile().readline().strip()
        ok += 1
    except Exception as e:
        failed += 1
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    time.sleep(0.01)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors}))
"""

SELF_CALLS = """
import json, socket
out = {}
for i in range(100):
    for port in (15001, 15006):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=3)
            s.sendall(b"x" * 100)
            r = "closed" if s.recv(10) == b"" else "answered"
            s.close()
        except OSError as e:
            r = type(e).__name__
        out[r] = out.get(r, 0) + 1
print(json.dumps(out))
"""

DNS_FLOOD = """
import json, socket, sys, time
import dns.message
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent = 0
q = dns.message.make_query("attack.example.org", "A")
for i in range(65536):
    q.id = i
    try:
        s.sendto(q.to_wire(), ("10.96.0.10", 53))
        sent += 1
    except BlockingIOError:
        time.sleep(0.001)
for guess in ("a.b.noded-loop-check.", "x.noded-loop-check."):
    s.sendto(dns.message.make_query(guess, "HINFO").to_wire(), ("10.96.0.10", 53))
print(json.dumps({"sent": sent}))
"""


def attacker_context(lab: Lab) -> ssl.SSLContext:
    """A mesh peer with a valid certificate from the lab's root: ns/evil/sa/attacker."""
    from noded.tunnel import ca as ca_mod
    from noded.tunnel.ca import CertificateAuthority
    from noded.tunnel.certs import WorkloadCert
    from noded.tunnel.tls import context

    ca_dir = os.path.join(lab.dir, "ca")
    ca = CertificateAuthority.load(f"{ca_dir}/root.pem", f"{ca_dir}/root-key.pem")
    key = ca_mod.new_key()
    identity = ca_mod.spiffe_id("cluster.local", "evil", "attacker")
    cert = ca.issue(identity, ca_mod.public_pem(key), datetime.timedelta(hours=1))
    now = datetime.datetime.now(datetime.UTC)
    creds = WorkloadCert(identity, cert, ca_mod.key_pem(key), now, now + datetime.timedelta(hours=1))
    with open(f"{ca_dir}/root.pem", "rb") as f:
        return context(False, creds, f.read(), os.path.join(lab.dir, "attacker-keys"))


def hbone_attacks(lab: Lab, target: str, vip: str) -> dict:
    """Run from the external host's netns (a mesh peer elsewhere): raw HTTP/2 over mTLS to target:15008."""
    import hpack

    from noded.kernel.podns import entered
    from noded.tunnel import frames as f

    ctx = attacker_context(lab)
    results: dict = {}

    def tls():
        with entered(f"/run/netns/{lab.state()['nodes']['node2']['netns']}"):  # a peer on another node
            raw = socket.create_connection((target, 15008), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="x")

    def read_all(sock, limit=5.0) -> bytes:
        sock.settimeout(limit)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except OSError:
            pass
        return out

    def goaway(data: bytes) -> str:
        codes, pos = [], 0
        while pos + 9 <= len(data):
            length = int.from_bytes(data[pos : pos + 3], "big")
            if data[pos + 3] == f.GOAWAY:
                codes.append(int.from_bytes(data[pos + 13 : pos + 17], "big"))
            pos += 9 + length
        return f.ErrorCode(codes[-1]).name if codes else "none"

    def headers(sid: int, authority: str, end: bool = True) -> bytes:
        block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
        return f.frame(f.HEADERS, f.END_HEADERS if end else 0, sid, block)

    # 3a. a header block that never ends
    with tls() as s:
        s.sendall(f.PREFACE + f.settings({}) + headers(1, f"{target}:8080", end=False))
        try:
            for _ in range(2000):
                s.sendall(f.frame(f.CONTINUATION, 0, 1, b"\0" * 16000))
        except OSError:
            pass
        results["continuation flood (32 MB)"] = goaway(read_all(s))
    # 3b. 20,000 open-and-reset streams
    with tls() as s:
        burst = b"".join(headers(i, f"{target}:8080") + f.rst_stream(i, 8) for i in range(1, 40001, 2))
        with contextlib.suppress(OSError):
            s.sendall(f.PREFACE + f.settings({}) + burst)
        results["20,000 open-and-reset streams"] = goaway(read_all(s))
    # 4. authorities that are not the pod's
    for authority in ("127.0.0.1:15001", "169.254.169.254:80", f"{vip}:80", "kubernetes.default:443"):
        with tls() as s:
            s.sendall(f.PREFACE + f.settings({}) + headers(1, authority))
            data = read_all(s, 1.0)
            status = "?"
            dec = hpack.Decoder()
            pos = 0
            while pos + 9 <= len(data):
                length = int.from_bytes(data[pos : pos + 3], "big")
                if data[pos + 3] == f.HEADERS:
                    status = dict(dec.decode(data[pos + 9 : pos + 9 + length])).get(":status", "?")
                pos += 9 + length
            results[f"CONNECT {authority}"] = status
    # 3c. 200 idle connections (closed by the server after SERVER_IDLE; here: they cost no thread)
    idle = []
    for _ in range(200):
        s = tls()
        s.sendall(f.PREFACE + f.settings({}))
        idle.append(s)
    results["idle connections held"] = len(idle)
    return results, idle


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60)
    a = p.parse_args()
    lab = Lab()
    lab.up(2, "ebpf")
    servers = []
    try:
        servers = mesh_pods(lab)
        lab.add_pod("default/client", "node1")
        path = os.path.join(lab.dir, "echo.yaml")
        with open(path, "w") as fh:
            fh.write(service_yaml("echo", {"app": "echo"}, [("http", "TCP", 80, 8080)]))
        lab.apply(path)
        vip = lab.state()["clusterIPs"]["default/echo"]
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=2)
        mesh_echo = lab.state()["pods"]["default/mesh-echo"]["ips"][0]
        pid = lab.daemon_pid("node1")
        before = {"fds": fds(pid), "rss": rss_mib(pid)}
        load = lab.popen(
            "default/client",
            [sys.executable, "-c", LOAD, vip, "echo.default.svc.cluster.local", str(a.seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        peak = dict(before)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                try:
                    peak["fds"] = max(peak["fds"], fds(pid))
                    peak["rss"] = max(peak["rss"], rss_mib(pid))
                except OSError:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results = {}
        time.sleep(2)
        for pod in ("default/mesh-client", "default/plain-client"):
            out = lab.run(pod, [sys.executable, "-c", SELF_CALLS], timeout=300)
            results[f"self-calls from {pod}"] = out.stdout.strip() or out.stderr[-200:]
        out = lab.run("default/plain-client", [sys.executable, "-c", DNS_FLOOD], timeout=300)
        results["DNS flood, every ID"] = out.stdout.strip() or out.stderr[-200:]
        ups = (node_status(lab, "node1")["dns"] or {}).get("upstreams", [])
        results["upstreams set aside afterwards"] = sum(1 for u in ups if u.get("looping"))
        hbone, idle = hbone_attacks(lab, mesh_echo, vip)
        results.update(hbone)
        client = json.loads(load.communicate(timeout=a.seconds + 60)[0])
        for s in idle:
            s.close()
        time.sleep(2)
        stop.set()
        after = {"fds": fds(pid), "rss": rss_mib(pid)}
        print(
            table(
                f"attacks on node1 while default/client used DNS and a VIP for {a.seconds:.0f} s",
                ["what", "result"],
                [[k, v] for k, v in results.items()],
            )
        )
        print(
            table(
                "the load client and node1's daemon",
                ["measure", "value"],
                [
                    ["client requests ok", client["ok"]],
                    ["client requests failed", client["failed"]],
                    ["client errors", json.dumps(client["errors"])],
                    ["daemon fds before / peak / after", f"{before['fds']} / {peak['fds']} / {after['fds']}"],
                    [
                        "daemon RSS MiB before / peak / after",
                        f"{before['rss']:.0f} / {peak['rss']:.0f} / {after['rss']:.0f}",
                    ],
                ],
            )
        )
    finally:
        for s in servers:
            s.kill()
        lab.down()


if __name__ == "__main__":
    main()
