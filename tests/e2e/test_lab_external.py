"""External entry points and traffic policies in a real 2-node lab, seen from the external host and from pods."""

import json
import os
import subprocess
import time

import pytest

from noded.lab.workloads import probe, service_yaml, wait_programmed
from tests.e2e.conftest import apply_text
from tests.e2e.test_lab_services import pod_ip, write_manifest
from tests.objects import endpoint, service, slice_

EXTERNAL = "10.77.0.2"
EXTERNAL6 = "fd77::2"


def node_address(lab, node, field="address"):
    return lab.state()["nodes"][node][field]


def apply_service(lab, name, **spec):
    apply_text(lab, service_yaml(name, {"app": "echo"}, [("http", "TCP", 80, 8080)], extra_spec=spec), f"{name}.yaml")
    state = lab.state()
    vip = state["clusterIPs"].get(f"default/{name}") or state["clusterIPs6"][f"default/{name}"]
    return vip, state.get("nodePorts", {}).get(f"default/{name}/http/TCP")


def peers(out):
    """answers are `NAME CLIENT-ADDRESS`: backend name -> set of client addresses it saw."""
    seen = {}
    for answer in out["answers"]:
        name, client = answer.split()
        seen.setdefault(name, set()).add(client)
    return seen


def health(lab, node, port):
    code = (
        "import json,urllib.request,urllib.error\n"
        f"try: r = urllib.request.urlopen('http://{node_address(lab, node)}:{port}/', timeout=3)\n"
        "except urllib.error.HTTPError as e: r = e\n"
        "print(json.dumps([r.status, json.loads(r.read())]))"
    )
    res = lab.run("external", ["python3", "-c", code], timeout=20)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_nodeport_from_outside_reaches_every_backend_masqueraded(lab):
    _vip, node_port = apply_service(lab, "np", type="NodePort")
    for node in ("node1", "node2"):
        wait_programmed(lab, node, f"{node_address(lab, node)}:{node_port}/TCP", ready=3)
        out = probe(lab, "external", "tcp", node_address(lab, node), node_port, count=60, message="peer")
        assert out["errors"] == {}
        seen = peers(out)
        assert set(seen) == {"echo-1", "echo-2", "echo-3"}
        # backends on the other node see this node's address, so their replies come back through it
        # (a backend on this node sees the client in eBPF mode, as with Cilium; kube-proxy masquerades it too)
        remote = {"echo-1"} if node == "node2" else {"echo-2", "echo-3"}
        assert all(seen[name] == {node_address(lab, node)} for name in remote), seen
    # and from a pod, to a node port on the other node
    out = probe(lab, "default/client", "tcp", node_address(lab, "node2"), node_port, count=30)
    assert out["errors"] == {} and len(out["answers"]) == 3


def test_load_balancer_with_local_policy_keeps_the_client_address(lab):
    _vip, node_port = apply_service(lab, "lb-local", type="LoadBalancer", externalTrafficPolicy="Local")
    state = lab.state()
    lb_ip = state["lbIPs"]["default/lb-local"]
    wait_programmed(lab, "node1", f"{lb_ip}:80/TCP", ready=1)
    wait_programmed(lab, "node2", f"{node_address(lab, 'node2')}:{node_port}/TCP", ready=2)
    # the external router sends the LB IP to node1: only node1's endpoint, client address kept
    out = probe(lab, "external", "tcp", lb_ip, 80, count=20, message="peer")
    assert out["errors"] == {} and peers(out) == {"echo-1": {EXTERNAL}}
    out = probe(lab, "external", "tcp", node_address(lab, "node2"), node_port, count=30, message="peer")
    assert out["errors"] == {} and peers(out) == {"echo-2": {EXTERNAL}, "echo-3": {EXTERNAL}}
    # pods still reach every endpoint through the LB IP (kube-proxy's short-circuit)
    out = probe(lab, "default/client", "tcp", lb_ip, 80, count=40)
    assert out["errors"] == {} and len(out["answers"]) == 3
    # health check node port: both nodes have local endpoints
    hc = lab.state()["nodePorts"]["default/lb-local/health"]
    for node, count in (("node1", 1), ("node2", 2)):
        status, body = health(lab, node, hc)
        assert status == 200 and body["localEndpoints"] == count
        assert body["service"] == {"namespace": "default", "name": "lb-local"}


def test_local_policy_without_local_endpoints_fails_health_check_and_drops(lab):
    e1 = pod_ip(lab, "default/echo-1")
    svc = service(
        "hc-only", "10.96.210.1", type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32700
    )
    svc["spec"]["ports"][0]["nodePort"] = 32701
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    write_manifest(lab, "hc-only.yaml", [svc, slice_("hc-only", [endpoint(e1, node="node1")], ports=ports)])
    wait_programmed(lab, "node1", f"{node_address(lab, 'node1')}:32701/TCP", ready=1)
    assert health(lab, "node1", 32700)[0] == 200
    status, body = health(lab, "node2", 32700)
    assert status == 503 and body["localEndpoints"] == 0
    out = probe(lab, "external", "tcp", node_address(lab, "node2"), 32701, count=2, timeout=1)
    assert out["errors"] == {"timed out": 2}  # dropped, as kube-proxy drops it: no reset, no ICMP error
    # a pod on node1 reaching node2's node port still gets the service (short-circuit to every endpoint)
    out = probe(lab, "default/client", "tcp", node_address(lab, "node2"), 32701, count=5)
    assert out["answers"] == {"echo-1": 5}


def test_local_policy_load_balancer_ip_without_local_endpoints_drops_tcp_and_udp(lab):
    """The LB IP reaches node1 (the lab's router sends it there) but the only endpoint is on node2: a Local
    policy drops the traffic in every mode (kube-proxy's behaviour), TCP and UDP alike, and node1's health
    check node port tells the load balancer so."""
    e2 = pod_ip(lab, "default/echo-2")
    lb_ip = "10.77.100.240"
    svc = service(
        "lb-remote",
        "10.96.210.9",
        [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "u", "port": 5300, "protocol": "UDP"}],
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        healthCheckNodePort=32709,
    )
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "u", "port": 5353, "protocol": "UDP"}]
    write_manifest(lab, "lb-remote.yaml", [svc, slice_("lb-remote", [endpoint(e2, node="node2")], ports=ports)])
    wait_programmed(lab, "node1", f"{lb_ip}:80/TCP")
    status, body = health(lab, "node1", 32709)
    assert status == 503 and body["localEndpoints"] == 0
    assert health(lab, "node2", 32709)[0] == 200
    out = probe(lab, "external", "tcp", lb_ip, 80, count=2, timeout=1)
    assert out["errors"] == {"timed out": 2}
    out = probe(lab, "external", "udp", lb_ip, 5300, count=2, timeout=1)
    assert out["answers"] == {} and out["errors"] == {"timed out": 2}
    # pods still get the service through the LB IP (short-circuit to every endpoint)
    assert probe(lab, "default/client", "tcp", lb_ip, 80, count=3)["answers"] == {"echo-2": 3}
    os.unlink(f"{lab.manifests}/lb-remote.yaml")


def test_node_port_without_endpoints_is_refused_from_outside(lab):
    svc = service("np-empty", "10.96.210.2", type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = 32702
    write_manifest(lab, "np-empty.yaml", [svc])
    wait_programmed(lab, "node2", f"{node_address(lab, 'node2')}:32702/TCP", ready=0)
    out = probe(lab, "external", "tcp", node_address(lab, "node2"), 32702, count=5, timeout=2)
    assert out["errors"] == {"Connection refused": 5}  # at once, as kube-proxy's reject: not a timeout


def test_load_balancer_and_external_ips_without_endpoints_are_refused_from_outside(lab):
    spec = {
        "type": "LoadBalancer",
        "ipFamilyPolicy": "PreferDualStack",
        "externalIPs": ["10.77.100.251", "fd77:100::fb"],
    }
    ports = [("http", "TCP", 80, 8080), ("udp", "UDP", 5300, 5353)]
    text = service_yaml("lb-empty", {"app": "nothing"}, ports, extra_spec=spec)
    apply_text(lab, text, "lb-empty.yaml")
    state = lab.state()
    addresses = [state["lbIPs"]["default/lb-empty"], state["lbIPs6"]["default/lb-empty"], *spec["externalIPs"]]
    for ip in addresses:
        host = f"[{ip}]" if ":" in ip else ip
        wait_programmed(lab, "node1", f"{host}:80/TCP", ready=0)
        out = probe(lab, "external", "tcp", ip, 80, count=3, timeout=2)
        assert out["errors"] == {"Connection refused": 3}, ip  # an ICMP port unreachable, as kube-proxy's reject
    # UDP too: a connected socket sees the ICMP port unreachable as ECONNREFUSED
    code = (
        "import socket,sys\n"
        "for ip in sys.argv[1:]:\n"
        "    s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    s.settimeout(2); s.connect((ip, 5300)); s.send(b'x')\n"
        "    try: s.recv(100); print('answered')\n"
        "    except OSError as e: print(type(e).__name__)\n"
    )
    res = lab.run("external", ["python3", "-c", code, *addresses], timeout=30)
    assert res.stdout.split() == ["ConnectionRefusedError"] * len(addresses), res.stdout + res.stderr


def test_external_ips_from_outside(lab):
    apply_service(lab, "ext-ip", externalIPs=["10.77.100.250"])
    wait_programmed(lab, "node1", "10.77.100.250:80/TCP", ready=3)
    out = probe(lab, "external", "tcp", "10.77.100.250", 80, count=40)
    assert out["errors"] == {} and set(out["answers"]) == {"echo-1", "echo-2", "echo-3"}


def test_session_affinity_for_external_clients(lab):
    _vip, node_port = apply_service(lab, "np-sticky", type="NodePort", sessionAffinity="ClientIP")
    wait_programmed(lab, "node1", f"{node_address(lab, 'node1')}:{node_port}/TCP", ready=3)
    out = probe(lab, "external", "tcp", node_address(lab, "node1"), node_port, count=20)
    assert out["errors"] == {} and len(out["answers"]) == 1


def test_ipv6_node_port_load_balancer_and_external_ip_from_outside(lab):
    """A dual-stack service, reached over IPv6 from the external host: node port (remote backends
    masqueraded to the node), LoadBalancer IP with Local policy (client address kept), external IP."""
    apply_service(lab, "dual", type="LoadBalancer", ipFamilyPolicy="PreferDualStack", externalIPs=["fd77:100::fa"])
    state = lab.state()
    node_port = state["nodePorts"]["default/dual/http/TCP"]
    for node, ready in (("node1", 3), ("node2", 3)):
        host = node_address(lab, node, "address6")
        wait_programmed(lab, node, f"[{host}]:{node_port}/TCP", ready=ready)
        out = probe(lab, "external", "tcp", host, node_port, count=60, message="peer")
        assert out["errors"] == {}
        seen = peers(out)
        assert set(seen) == {"echo-1", "echo-2", "echo-3"}
        remote = {"echo-1"} if node == "node2" else {"echo-2", "echo-3"}
        assert all(seen[name] == {host} for name in remote), seen
    lb6 = state["lbIPs6"]["default/dual"]
    wait_programmed(lab, "node1", f"[{lb6}]:80/TCP", ready=3)
    out = probe(lab, "external", "tcp", lb6, 80, count=40)
    assert out["errors"] == {} and set(out["answers"]) == {"echo-1", "echo-2", "echo-3"}
    out = probe(lab, "external", "tcp", "fd77:100::fa", 80, count=40)
    assert out["errors"] == {} and set(out["answers"]) == {"echo-1", "echo-2", "echo-3"}


def test_ipv6_local_policy_keeps_the_client_address(lab):
    apply_service(lab, "dual-local", type="LoadBalancer", ipFamilies=["IPv6"], externalTrafficPolicy="Local")
    state = lab.state()
    node_port = state["nodePorts"]["default/dual-local/http/TCP"]
    host = node_address(lab, "node2", "address6")
    wait_programmed(lab, "node2", f"[{host}]:{node_port}/TCP", ready=2)
    out = probe(lab, "external", "tcp", host, node_port, count=30, message="peer")
    assert out["errors"] == {} and peers(out) == {"echo-2": {EXTERNAL6}, "echo-3": {EXTERNAL6}}
    lb6 = state["lbIPs6"]["default/dual-local"]
    wait_programmed(lab, "node1", f"[{lb6}]:80/TCP", ready=1)
    out = probe(lab, "external", "tcp", lb6, 80, count=10, message="peer")
    assert out["errors"] == {} and peers(out) == {"echo-1": {EXTERNAL6}}


def test_internal_traffic_policy_local(lab):
    vip, _ = apply_service(lab, "itp-local", internalTrafficPolicy="Local")
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1)
    assert probe(lab, "default/client", "tcp", vip, 80, count=20)["answers"] == {"echo-1": 20}


def test_prefer_close_keeps_traffic_in_the_zone(lab):
    if "default/client-2" not in lab.state()["pods"]:
        lab.add_pod("default/client-2", "node2")
    vip, _ = apply_service(lab, "close", trafficDistribution="PreferClose")
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1)
    wait_programmed(lab, "node2", f"{vip}:80/TCP", ready=2)
    assert probe(lab, "default/client", "tcp", vip, 80, count=20)["answers"] == {"echo-1": 20}
    assert set(probe(lab, "default/client-2", "tcp", vip, 80, count=30)["answers"]) == {"echo-2", "echo-3"}


def test_pod_reaches_itself_through_its_service(lab):
    e1 = pod_ip(lab, "default/echo-1")
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    # the endpoint names its node as a real slice does (nftables: only this node's endpoints are in the hairpin
    # set); the IPv6 one below names none (kept in the set, to be safe)
    here = endpoint(e1, node=lab.state()["pods"]["default/echo-1"]["node"])
    write_manifest(lab, "self.yaml", [service("self", "10.96.211.1"), slice_("self", [here], ports=ports)])
    wait_programmed(lab, "node1", "10.96.211.1:80/TCP", ready=1)
    out = probe(lab, "default/echo-1", "tcp", "10.96.211.1", 80, count=5)
    assert out["answers"] == {"echo-1": 5}
    # IPv6 too (the iptables mode's hairpin match compares the 128-bit addresses word by word)
    e1_6 = next(ip for ip in lab.state()["pods"]["default/echo-1"]["ips"] if ":" in ip)
    svc6 = service("self6", "fd96::211:1", ipFamilies=["IPv6"])
    write_manifest(lab, "self6.yaml", [svc6, slice_("self6", [endpoint(e1_6)], ports=ports, address_type="IPv6")])
    wait_programmed(lab, "node1", "[fd96::211:1]:80/TCP", ready=1)
    out = probe(lab, "default/echo-1", "tcp", "fd96::211:1", 80, count=5)
    assert out["answers"] == {"echo-1": 5}


@pytest.fixture(autouse=True)
def _dump_on_failure(lab, request):
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        subprocess.run(["nsenter", "--net=/run/netns/noded-node1", "nft", "list", "ruleset"], check=False)


# -- the eBPF NodePort flow state (issue 17, item 11) ---------------------------------------------------
def nat_entries(lab, node):
    """{map name: [(key, value)]} of the node's NodePort translation state, read from the pinned maps."""
    from noded.bpf import structs
    from noded.bpf.libbpf import Map

    bpffs = lab.state()["nodes"][node]["bpffsPath"]
    out = {}
    for name in ("noded_nat", "noded_nat_new"):
        m = Map.open_pinned(f"{bpffs}/{name}", structs.NatKey, structs.NatVal)
        try:
            out[name] = list(m.items())
        finally:
            m.close()
    return out


def involving(entries, ip, port):
    """Entries whose key or rewrite names ip:port (a backend)."""
    from noded.bpf import structs

    def names(addr, p):
        return structs.unpack_addr(addr) == ip and structs.host_port(p) == port

    return [(k, v) for k, v in entries if names(k.saddr, k.sport) or names(v.daddr, v.dport)]


FLOOD = """
import random, socket, struct, sys, time
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
d = socket.inet_aton(dst)
rnd = random.Random(7)
start = time.monotonic()
for i in range(count):
    src = struct.pack("!I", (198 << 24 | 18 << 16) + rnd.randrange(1 << 17))  # 198.18.0.0/15, spoofed
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, i & 0xFFFF, 0, 64, 6, 0, src, d)
    tcp = struct.pack("!HHIIBBHHH", rnd.randrange(1024, 65535), port, rnd.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
    s.sendto(ip + tcp, (dst, 0))
print(round(time.monotonic() - start, 2))
"""


def test_a_spoofed_syn_flood_does_not_evict_established_node_port_flows(lab):
    """Spoofed SYNs only ever fill noded_nat_new: an established connection through a node port keeps
    working through 300,000 of them (more than noded_nat holds), and noded_nat holds only real flows."""
    if lab.mode != "ebpf":
        pytest.skip("the eBPF NodePort flow state")
    import ipaddress

    from noded.bpf import structs

    _vip, node_port = apply_service(lab, "np-flood", type="NodePort")
    node2 = node_address(lab, "node2")
    wait_programmed(lab, "node2", f"{node2}:{node_port}/TCP", ready=3)
    hold = lab.popen(
        "external",
        ["python3", "-m", "noded.lab.probe", "hold", node2, str(node_port), "--seconds", "15", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        flood = lab.run("external", ["python3", "-c", FLOOD, node2, str(node_port), "300000"], timeout=120)
        assert flood.returncode == 0, flood.stderr
        entries = nat_entries(lab, "node2")
        spoofed = ipaddress.ip_network("198.18.0.0/15")

        def from_spoofed(kv):
            k, v = kv
            return any(ipaddress.ip_address(structs.unpack_addr(a)) in spoofed for a in (k.saddr, v.daddr))

        assert not any(map(from_spoofed, entries["noded_nat"]))  # the established flows are real ones only
        assert sum(map(from_spoofed, entries["noded_nat_new"])) > 10_000  # the flood churns the new map
        assert len(entries["noded_nat_new"]) <= 65536
        out = json.loads(hold.communicate(timeout=60)[0])
        assert out["failures"] == [] and out["replies"] > 100, out
    finally:
        hold.kill()
        hold.wait()


def test_node_port_flows_close_age_and_go_with_their_backend(lab):
    """A FIN makes a flow closing and the collector removes it once that state's timeout has passed; an
    idle established flow outlives that; a UDP flow goes as soon as its backend is removed, as kube-proxy
    deletes the conntrack entries of UDP endpoints that left."""
    if lab.mode != "ebpf":
        pytest.skip("the eBPF NodePort flow state")
    from noded.bpf import structs
    from noded.bpf.nat_gc import NatCollector

    e2 = pod_ip(lab, "default/echo-2")
    svc = service(
        "np-ct",
        "10.96.210.20",
        [{"name": "t", "port": 80, "protocol": "TCP"}, {"name": "u", "port": 5300, "protocol": "UDP"}],
        type="NodePort",
    )
    svc["spec"]["ports"][0]["nodePort"] = 32711
    svc["spec"]["ports"][1]["nodePort"] = 32712
    ports = [{"name": "t", "port": 8080, "protocol": "TCP"}, {"name": "u", "port": 5353, "protocol": "UDP"}]
    write_manifest(lab, "np-ct.yaml", [svc, slice_("np-ct", [endpoint(e2, node="node2")], ports=ports)])
    node2 = node_address(lab, "node2")
    wait_programmed(lab, "node2", f"{node2}:32712/UDP", ready=1)
    assert probe(lab, "external", "tcp", node2, 32711, count=1)["answers"] == {"echo-2": 1}  # opened and closed
    udp = probe(lab, "external", "udp", node2, 32712, count=3)  # one socket: a reply, then the client again
    assert sum(udp["answers"].values()) == 3
    time.sleep(0.3)
    entries = nat_entries(lab, "node2")
    tcp_states = {structs.CT_STATES[v.state] for _k, v in involving(entries["noded_nat"], e2, 8080)}
    assert tcp_states == {"closing"}, tcp_states
    assert len(involving(entries["noded_nat"], e2, 5353)) == 2  # established: proven two-way
    collector = NatCollector(lab.state()["nodes"]["node2"]["bpffsPath"])
    assert collector.collect(age=15) >= 2  # as a run 15 s from now: closing (10 s) goes, the rest stays
    entries = nat_entries(lab, "node2")
    assert involving(entries["noded_nat"], e2, 8080) == []
    assert len(involving(entries["noded_nat"], e2, 5353)) == 2
    assert collector.collect(age=200) >= 2  # idle UDP (120 s) too
    assert involving(nat_entries(lab, "node2")["noded_nat"], e2, 5353) == []
    # a UDP flow follows its endpoints: the same client socket, its backend replaced, reaches the new one
    code = (
        "import socket, json\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        "s.bind(('0.0.0.0', 40123)); out = []\n"
        f"for _ in range(3): s.sendto(b'x', ('{node2}', 32712)); out.append(s.recv(100).decode().split()[0])\n"
        "print(json.dumps(out))"
    )
    assert json.loads(lab.run("external", ["python3", "-c", code]).stdout) == ["echo-2"] * 3
    e1 = pod_ip(lab, "default/echo-1")
    write_manifest(lab, "np-ct.yaml", [svc, slice_("np-ct", [endpoint(e1, node="node1")], ports=ports)])
    wait_programmed(lab, "node2", f"{node2}:32712/UDP", ready_ips=[e1])
    assert json.loads(lab.run("external", ["python3", "-c", code]).stdout) == ["echo-1"] * 3
    assert involving(nat_entries(lab, "node2")["noded_nat"], e2, 5353) == []
    os.unlink(f"{lab.manifests}/np-ct.yaml")


def test_one_client_port_reaches_one_backend_through_two_frontends(lab):
    """Replies of a backend on the node name no frontend (backend -> client address and port), so one
    client port used towards two node ports of the same backend collides there: held open at once, and
    one after the other while the first closes. Both connections are answered, by the right frontend,
    with the client's address kept (conntrack changes the client's port on such a clash; so does noded)."""
    e2 = pod_ip(lab, "default/echo-2")
    ports = [{"name": "t", "port": 8080, "protocol": "TCP"}]
    objects = []
    for name, vip, node_port in (("np-a", "10.96.210.21", 32713), ("np-b", "10.96.210.22", 32714)):
        svc = service(name, vip, [{"name": "t", "port": 80, "protocol": "TCP"}], type="NodePort")
        svc["spec"]["ports"][0]["nodePort"] = node_port
        objects += [svc, slice_(name, [endpoint(e2, node="node2")], ports=ports)]
    write_manifest(lab, "np-clash.yaml", objects)
    node2 = node_address(lab, "node2")
    for node_port in (32713, 32714):
        wait_programmed(lab, "node2", f"{node2}:{node_port}/TCP", ready=1)
    code = (
        "import socket, json\n"
        "def ask(port, src):\n"
        "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"    s.bind(('0.0.0.0', src)); s.settimeout(3); s.connect(('{node2}', port))\n"
        "    s.sendall(b'peer\\n'); return s, [port, s.getpeername()[1], s.makefile().readline().split()]\n"
        "a, first = ask(32713, 20125); b, second = ask(32714, 20125)\n"  # both open at once
        "a.sendall(b'peer\\n'); again = a.makefile().readline().split()\n"
        "a.close(); b.close()\n"
        "c, third = ask(32713, 20126); c.close()\n"
        "d, fourth = ask(32714, 20126); d.close()\n"  # the first one closing
        "print(json.dumps([first, second, again, third, fourth]))"
    )
    res = lab.run("external", ["python3", "-c", code], timeout=30)  # source ports outside the ephemeral range
    assert res.returncode == 0, res.stderr
    first, second, again, third, fourth = json.loads(res.stdout)
    # eBPF keeps the client's address for a backend on the node; kube-proxy's modes masquerade it
    for port, peer_port, (name, client) in (first, second, third, fourth, [32713, 32713, again]):
        assert peer_port == port and name == "echo-2", (first, second, third, fourth)
        assert client == EXTERNAL or lab.mode != "ebpf"
    os.unlink(f"{lab.manifests}/np-clash.yaml")
