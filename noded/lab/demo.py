"""`noded lab demo`: a two-node lab where a pod reaches a service whose backends run on both nodes."""

from __future__ import annotations

import os
import tempfile
from collections import Counter

from noded.lab.lab import Lab
from noded.lab.workloads import end_demo, probe, service_yaml, start_echo, wait_programmed


def demo(lab: Lab, keep: bool = False, mode: str = "ebpf") -> int:
    print("== bringing up a 2-node lab (eBPF socket-LB)")
    if not lab.is_up:
        lab.up(2, mode)
    servers = []
    try:
        for pod, node in (("default/echo-1", "node1"), ("default/echo-2", "node2"), ("default/echo-3", "node2")):
            p = lab.add_pod(pod, node, {"app": "echo"})
            print(f"   pod {pod} on {node}: {p['ips'][0]}")
            servers.append(start_echo(lab, pod, tcp=8080, udp=5353))
        client = lab.add_pod("default/client", "node1")
        print(f"   pod default/client on node1: {client['ips'][0]}")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(service_yaml("echo", {"app": "echo"}, [("http", "TCP", 80, 8080), ("udp", "UDP", 53, 5353)]))
        lab.apply(f.name)
        os.unlink(f.name)
        vip = lab.state()["clusterIPs"]["default/echo"]
        took = wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=3)
        print(f"== service default/echo got ClusterIP {vip}; programmed on node1 in {took * 1000:.0f} ms")
        tcp = probe(lab, "default/client", "tcp", vip, 80, count=300)
        print(f"== 300 TCP connections from client to {vip}:80 (getpeername sees {', '.join(tcp['peers'])}):")
        for name, n in sorted(Counter(tcp["answers"]).items()):
            print(f"   {name:<8} {n}")
        udp = probe(lab, "default/client", "udp", vip, 53, count=5)
        print(f"== UDP to {vip}:53: answers {udp['answers']}, replies came from {', '.join(udp['sources'])}")
        ok = len(tcp["answers"]) == 3 and not tcp["errors"] and udp["sources"] == [f"{vip}:53"]
        print("== demo", "OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        end_demo(lab, servers, keep)
