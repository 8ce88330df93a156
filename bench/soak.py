"""No-loss soak in the 2-node lab: a client pod keeps resolving a service by DNS name and opening
connections to it while the daemons are restarted, killed -9, their manifest source taken away (for 35% of
the run) and brought back, and node1 gains and loses an address (which noded must pick up as a node port
address). Reports attempts and failures (DNS and TCP), what happened when, and the daemons' RSS over time.

    bench/soak.py --seconds 420
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import rss_mib, table
from noded.lab.lab import Lab
from noded.lab.workloads import service_yaml, start_echo, wait_programmed

NEW_ADDRESS = "10.77.0.111"

CLIENT = """
import json, socket, sys, time
import dns.message, dns.query
end = time.monotonic() + float(sys.argv[1])
name = "echo.default.svc.cluster.local."
log = []
while time.monotonic() < end:
    t = time.time()
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), "169.254.20.10", timeout=1)
        ip = [a.address for rr in r.answer for a in rr][0]
    except Exception as e:
        log.append([t, "dns", repr(e)])
        continue
    try:
        with socket.create_connection((ip, 80), timeout=2) as s:
            s.sendall(b"hello\\n")
            if not s.makefile().readline():
                raise ConnectionError("no answer")
        log.append([t, "ok", ""])
    except Exception as e:
        log.append([t, "tcp", repr(e)])
    time.sleep(0.01)
print(json.dumps(log))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=420)
    args = parser.parse_args()
    total = args.seconds
    lab = Lab()
    lab.up(2, "ebpf")
    servers = []
    try:
        for pod in ("default/echo-1", "default/echo-2"):
            lab.add_pod(pod, "node2", {"app": "echo"})
            servers.append(start_echo(lab, pod, tcp=8080))
        lab.add_pod("default/client", "node1")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(service_yaml("echo", {"app": "echo"}, [("http", "TCP", 80, 8080)]))
        lab.apply(f.name)
        os.unlink(f.name)
        vip = lab.state()["clusterIPs"]["default/echo"]
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=2)
        client = lab.popen(
            "default/client",
            [sys.executable, "-c", CLIENT, str(total)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        start = time.time()
        events = []
        rss = []

        def at(t: float) -> None:
            while time.time() - start < t:
                rss.append(
                    [
                        round(time.time() - start),
                        *(rss_mib(lab.daemon_pid(n) or 0) if lab.daemon_pid(n) else 0.0 for n in ("node1", "node2")),
                    ]
                )
                time.sleep(min(5, max(0.1, t - (time.time() - start))))

        def restart(node: str, sig: int, what: str) -> None:
            events.append([round(time.time() - start, 1), what])
            lab.stop_daemon(node, sig)
            lab.start_daemon(node)
            lab.wait_ready(node)
            events.append([round(time.time() - start, 1), f"{node} ready again"])

        manifests_away = lab.manifests + ".away"
        node1_ns = lab.state()["nodes"]["node1"]["netns"]

        def address(op: str) -> None:
            events.append([round(time.time() - start, 1), f"node1 address {NEW_ADDRESS} {op}"])
            subprocess.run(["ip", "-n", node1_ns, "addr", op, f"{NEW_ADDRESS}/24", "dev", "eth0"], check=True)
            deadline = time.monotonic() + 40  # the next full sync (30 s) re-reads the node's addresses
            while time.monotonic() < deadline:
                seen = [line for line in lab.daemon_log("node1").splitlines() if "node port addresses" in line]
                if seen and (NEW_ADDRESS in seen[-1]) == (op == "add"):
                    events.append(
                        [round(time.time() - start, 1), f"noded followed: {seen[-1].split('] ')[-1].strip()}"]
                    )
                    return
                time.sleep(0.5)
            events.append([round(time.time() - start, 1), "noded did NOT follow the address change"])

        plan = [
            (total * 0.15, lambda: restart("node1", signal.SIGTERM, "node1 daemon restarted (SIGTERM)")),
            (total * 0.30, lambda: restart("node1", signal.SIGKILL, "node1 daemon killed -9 and started")),
            (
                total * 0.45,
                lambda: (
                    events.append([round(time.time() - start, 1), "manifest source removed"]),
                    os.rename(lab.manifests, manifests_away),
                ),
            ),
            (total * 0.55, lambda: address("add")),
            (total * 0.70, lambda: address("del")),
            (
                total * 0.80,
                lambda: (
                    os.rename(manifests_away, lab.manifests),
                    events.append([round(time.time() - start, 1), "manifest source restored"]),
                ),
            ),
            (total * 0.90, lambda: restart("node2", signal.SIGKILL, "node2 daemon killed -9 and started")),
        ]
        for t, action in plan:
            at(t)
            action()
        at(total)
        out, err = client.communicate(timeout=60)
        if not out.strip():
            raise RuntimeError(f"the client printed nothing: {err}")
        log = json.loads(out)
        attempts = len(log)
        failed = [e for e in log if e[1] != "ok"]
        print(
            table(
                f"Soak: {total} s, DNS name + VIP connections from node1 to echo on node2",
                ["attempted", "failed", "dns failures", "tcp failures"],
                [[attempts, len(failed), sum(e[1] == "dns" for e in failed), sum(e[1] == "tcp" for e in failed)]],
            )
        )
        print()
        print(table("What happened", ["t (s)", "event"], events))
        print()
        samples = rss[:: max(1, len(rss) // 12)]
        print(
            table("Daemon RSS (MiB)", ["t (s)", "node1", "node2"], [[t, f"{a:.1f}", f"{b:.1f}"] for t, a, b in samples])
        )
        for e in failed[:10]:
            print("failure:", round(e[0] - start, 1), e[1], e[2])
    finally:
        for s in servers:
            s.kill()
        if os.path.exists(lab.manifests + ".away") and not os.path.exists(lab.manifests):
            os.rename(lab.manifests + ".away", lab.manifests)
        lab.down()


if __name__ == "__main__":
    main()
