"""One 2-node lab for the e2e tier, removed at the end whatever happened."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest

from noded.lab import netns
from noded.lab.lab import Lab
from noded.lab.workloads import service_yaml, start_echo


def fresh_lab(mode: str = "ebpf", nodes: int = 2) -> Lab:
    """A new lab, refusing to run over one that is already up."""
    lab = Lab()
    if lab.is_up or netns.list_ours("noded-node"):
        pytest.fail("a lab is already up on this machine: run `noded lab down` first")
    lab.up(nodes, mode)
    return lab


@pytest.fixture(scope="module", params=["ebpf", "nftables", "iptables"])
def lab(request):
    lab = fresh_lab(request.param)
    lab.mode = request.param
    servers = []
    try:
        for pod, node in (("default/echo-1", "node1"), ("default/echo-2", "node2"), ("default/echo-3", "node2")):
            lab.add_pod(pod, node, {"app": "echo"})
            servers.append(start_echo(lab, pod, tcp=8080, udp=5353))
        lab.add_pod("default/client", "node1")
        lab.servers = servers
        yield lab
    finally:
        for s in servers:
            s.kill()
        lab.down()


def apply_text(lab: Lab, text: str, name: str) -> None:
    path = os.path.join(tempfile.mkdtemp(), name)
    with open(path, "w") as f:
        f.write(text)
    lab.apply(path)


def echo_service(lab: Lab) -> str:
    apply_text(
        lab, service_yaml("echo", {"app": "echo"}, [("http", "TCP", 80, 8080), ("udp", "UDP", 5300, 5353)]), "echo.yaml"
    )
    return lab.state()["clusterIPs"]["default/echo"]


def dig(lab, pod, name, server="10.96.0.10", tcp=False, uncaptured=False):
    """(rcode, answer data) of an A query from `pod`; `uncaptured` sends it on a socket marked as the
    tunnel's, which the in-pod capture lets through (so it reaches the node-local listener itself)."""
    code = (
        "import dns.message, dns.query, json, socket, sys\n"
        f"q = dns.message.make_query({name!r}, 'A')\n"
        f"family = socket.AF_INET6 if ':' in {server!r} else socket.AF_INET\n"
        f"s = socket.socket(family, socket.SOCK_STREAM if {tcp} else socket.SOCK_DGRAM)\n"
        f"s.setsockopt(socket.SOL_SOCKET, 36, 0x539) if {uncaptured} else None\n"
        f"s.settimeout(3); s.connect(({server!r}, 53)) if {tcp} else None\n"
        f"r = (dns.query.tcp if {tcp} else dns.query.udp)(q, {server!r}, timeout=3, sock=s)\n"
        "print(json.dumps([dns.rcode.to_text(r.rcode()), [getattr(i, 'address', None) or i.to_text()\n"
        "    for a in r.answer for i in a]]))"
    )
    res = lab.run(pod, [sys.executable, "-c", code], timeout=20)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
