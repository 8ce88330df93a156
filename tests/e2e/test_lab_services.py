"""The foundation issue's end-to-end checks, in a real 2-node lab."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import yaml

from noded.files import write_atomic
from noded.lab import netns
from noded.lab.workloads import follow_until, node_status, probe, programmed, service_yaml, wait_programmed
from tests.e2e.conftest import apply_text, dig, echo_service
from tests.objects import endpoint, service, slice_


def pod_ip(lab, key):
    return lab.state()["pods"][key]["ips"][0]


def write_manifest(lab, name, docs):
    write_atomic(f"{lab.manifests}/{name}", yaml.safe_dump_all(docs) if isinstance(docs, list) else docs)


def test_pod_reaches_clusterip_with_backends_on_both_nodes(lab):
    vip = echo_service(lab)
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=3)
    out = probe(lab, "default/client", "tcp", vip, 80, count=300)
    assert out["errors"] == {}
    assert set(out["answers"]) == {"echo-1", "echo-2", "echo-3"}  # node1 and node2 backends
    assert out["peers"] == [f"{vip}:80"]
    udp = probe(lab, "default/client", "udp", vip, 5300, count=10)
    assert sum(udp["answers"].values()) == 10
    assert udp["sources"] == [f"{vip}:5300"]


def test_endpoint_changes_followed_within_a_second(lab):
    e1, e2, e3 = (pod_ip(lab, f"default/echo-{i}") for i in (1, 2, 3))
    vip = "10.96.200.1"
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    fe = f"{vip}:80/TCP"

    def set_endpoints(*eps):
        start = time.monotonic()
        write_manifest(lab, "manual.yaml", [service("manual", vip), slice_("manual", list(eps), ports=ports)])
        return start

    set_endpoints(endpoint(e1, node="node1"))
    wait_programmed(lab, "node1", fe, ready=1)
    assert probe(lab, "default/client", "tcp", vip, 80, count=10)["answers"] == {"echo-1": 10}

    # added
    start = set_endpoints(endpoint(e1), endpoint(e2))
    wait_programmed(lab, "node1", fe, ready_ips=[e1, e2])
    assert time.monotonic() - start < 1.0
    assert set(probe(lab, "default/client", "tcp", vip, 80, count=40)["answers"]) == {"echo-1", "echo-2"}

    # marked terminating (still serving): new connections avoid it while another is ready
    start = set_endpoints(endpoint(e1, ready=False, serving=True, terminating=True), endpoint(e2), endpoint(e3))
    wait_programmed(lab, "node1", fe, ready_ips=[e2, e3])
    assert time.monotonic() - start < 1.0
    assert set(probe(lab, "default/client", "tcp", vip, 80, count=40)["answers"]) == {"echo-2", "echo-3"}

    # removed
    start = set_endpoints(endpoint(e3))
    wait_programmed(lab, "node1", fe, ready_ips=[e3])
    assert time.monotonic() - start < 1.0
    assert probe(lab, "default/client", "tcp", vip, 80, count=20)["answers"] == {"echo-3": 20}

    # scaled to zero: refused at once, not a timeout
    start = set_endpoints()
    wait_programmed(lab, "node1", fe, ready_ips=[])
    assert time.monotonic() - start < 1.0
    out = probe(lab, "default/client", "tcp", vip, 80, count=10, timeout=5)
    assert out["errors"] == {"Connection refused": 10}
    assert out["seconds"] < 2
    os.unlink(f"{lab.manifests}/manual.yaml")


def test_dns_to_a_service_of_its_own_reaches_that_server_and_cluster_dns_reaches_noded(lab):
    """Port 53 belongs to the cluster resolver only at the cluster DNS address: a pod's query to a DNS service
    of its own gets that server's answer, a non-DNS datagram on port 53 arrives untouched, and the cluster
    DNS address (no service behind it here) is still answered by noded — in every services mode."""
    ports = [("dns", "UDP", 53, 5353), ("dns-tcp", "TCP", 53, 8080)]
    apply_text(lab, service_yaml("owndns", {"app": "echo"}, ports), "owndns.yaml")
    vip = lab.state()["clusterIPs"]["default/owndns"]
    wait_programmed(lab, "node1", f"{vip}:53/UDP", ready=3)
    rcode, answers = dig(lab, "default/client", "anything.example.", server=vip)
    assert rcode == "NOERROR" and answers and answers[0].strip('"') in {"echo-1", "echo-2", "echo-3"}
    out = probe(lab, "default/client", "udp", vip, 53, count=10)
    assert sum(out["answers"].values()) == 10 and set(out["answers"]) <= {"echo-1", "echo-2", "echo-3"}
    assert out["sources"] == [f"{vip}:53"]
    echo_vip = echo_service(lab)
    wait_programmed(lab, "node1", f"{echo_vip}:80/TCP", ready=3)
    for tcp in (False, True):
        assert dig(lab, "default/client", "echo.default.svc.cluster.local.", tcp=tcp) == ["NOERROR", [echo_vip]]


POD_RESOLV_CONF = (  # what the kubelet writes for a ClusterFirst pod in default (clusterDNS 10.96.0.10)
    "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
)


def run_with_pod_resolv_conf(lab, pod: str, argv: list[str]) -> subprocess.CompletedProcess:
    """argv in the pod with the kubelet's resolv.conf: bind-mounted over /etc/resolv.conf in a mount namespace
    of the command's own (the host's file is untouched)."""
    path = os.path.join(tempfile.mkdtemp(prefix="noded-test-resolv-"), "resolv.conf")
    with open(path, "w") as f:
        f.write(POD_RESOLV_CONF)
    script = f'mount --bind {path} /etc/resolv.conf && exec "$@"'
    return lab.run(pod, ["unshare", "--mount", "sh", "-c", script, "sh", *argv], timeout=30)


def test_glibc_and_musl_style_clients_resolve_through_the_search_path(lab):
    """Issue 20: real stub resolvers — glibc's (`getent ahosts`, A and AAAA in parallel from one socket) and
    busybox's static nslookup (its own resolver, as musl-based images have) — resolve a service by its short,
    partial and full names through the pod's search path at the cluster DNS address, in every services mode.
    The pod's first expansion of a partial name is answered by the resolver's search-path shortcut (a CNAME),
    the full names by the fast path. busybox applies the search list only to names without a dot (with any
    cluster DNS), so it is asked the short and the full name."""
    vip = echo_service(lab)
    for name in ("echo", "echo.default", "echo.default.svc", "echo.default.svc.cluster.local"):
        deadline = time.monotonic() + 10
        while True:
            glibc = run_with_pod_resolv_conf(lab, "default/client", ["getent", "ahostsv4", name])
            musl = None
            if "." not in name or name.endswith(".cluster.local"):
                musl = run_with_pod_resolv_conf(lab, "default/client", ["busybox", "nslookup", "-type=a", name])
            got = (glibc.stdout.split()[:1], musl is None or vip in musl.stdout.split())
            if got == ([vip], True):
                break
            assert time.monotonic() < deadline, (name, glibc, musl)
            time.sleep(0.2)


def test_the_cluster_dns_address_is_answered_on_the_node_for_every_pod(lab):
    """Issue 20, item 1: a query to the cluster DNS address (what the kubelet puts in resolv.conf) that no
    in-pod capture takes (capture off, or a socket the capture lets through) reaches the node, which answers
    it itself: cluster names from the fast path, the rest (TCP, misses) from the resolver, in every
    services mode; a kube-dns Service at that address with an endpoint of its own is not translated on
    port 53 (noded is the cluster's DNS), its other ports are."""
    vip = echo_service(lab)
    name = "echo.default.svc.cluster.local."
    deadline = time.monotonic() + 10
    while "10.96.0.10:53" not in (node_status(lab, "node1")["dns"].get("clusterDNS") or []):
        assert time.monotonic() < deadline, node_status(lab, "node1")["dns"]
        time.sleep(0.1)
    while True:  # the fast path sits on the pods' bridge once the interface check has seen it (every 2 s)
        before = node_status(lab, "node1")["dns"]
        answer = dig(lab, "default/client", name, "10.96.0.10", uncaptured=True)
        after = node_status(lab, "node1")["dns"]
        if answer == ["NOERROR", [vip]] and after["fastPath"]["answered"] - before["fastPath"]["answered"] == 1:
            assert after["queries"] == before["queries"]  # the resolver never saw it
            break
        assert time.monotonic() < deadline, (answer, after)
        time.sleep(0.2)
    assert dig(lab, "default/client", name, "10.96.0.10", tcp=True, uncaptured=True) == ["NOERROR", [vip]]
    missing = dig(lab, "default/client", "nope.default.svc.cluster.local.", "10.96.0.10", uncaptured=True)
    assert missing[0] == "NXDOMAIN"
    assert node_status(lab, "node1")["dns"]["queries"] == after["queries"] + 2  # TCP and the miss: the resolver
    # a kube-dns Service at the address, backed by a pod that answers DNS itself (TXT: its name)
    dns_ports = [("dns", "UDP", 53, 5353), ("metrics", "TCP", 9153, 8080)]
    text = service_yaml("kube-dns", {"app": "echo"}, dns_ports, namespace="kube-system")
    text = text.replace("spec:\n", "spec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n", 1)
    apply_text(lab, text, "kube-dns.yaml")
    wait_programmed(lab, "node1", "10.96.0.10:9153/TCP")
    assert "10.96.0.10:53/UDP" not in programmed(lab, "node1")
    assert dig(lab, "default/client", name, "10.96.0.10", uncaptured=True) == ["NOERROR", [vip]]
    lab.delete("kube-dns.yaml")


def test_connected_udp_client_follows_its_endpoints(lab):
    """A connected UDP socket to a ClusterIP (glibc's resolver, most UDP clients) reaches the remaining
    endpoint right after its own is removed: eBPF mode destroys the socket (the client connects again),
    the netfilter modes delete the stale conntrack flow. Five trials each way."""
    e1, e2 = pod_ip(lab, "default/echo-1"), pod_ip(lab, "default/echo-2")
    vip = "10.96.200.7"
    port = [{"name": "u", "port": 5353, "protocol": "UDP"}]
    fe = f"{vip}:7000/UDP"
    svc = service("follow", vip, [{"name": "u", "port": 7000, "protocol": "UDP", "targetPort": 5353}])
    names, nodes = {e1: "echo-1", e2: "echo-2"}, {e1: "node1", e2: "node2"}
    current, other = e1, e2
    write_manifest(lab, "follow.yaml", [svc, slice_("follow", [endpoint(current, node=nodes[current])], ports=port)])
    wait_programmed(lab, "node1", fe, ready_ips=[current])
    follower = lab.popen(
        "default/client",
        [
            sys.executable,
            "-m",
            "noded.lab.probe",
            "follow",
            vip,
            "7000",
            *("--seconds", "60", "--interval", "0.01", "--timeout", "0.2"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        delays = []
        for _ in range(5):
            follow_until(follower, names[current])
            write_manifest(
                lab, "follow.yaml", [svc, slice_("follow", [endpoint(other, node=nodes[other])], ports=port)]
            )
            changed = time.time()
            event, _before = follow_until(follower, names[other])
            delays.append(event["t"] - changed)
            current, other = other, current
        assert max(delays) < 1.5, delays  # the manifest directory is read within ~0.2 s, then one sync
        if lab.mode == "ebpf":
            term = node_status(lab, "node1")["socketTermination"]
            assert term["enabled"] and term["destroyed"] >= 5, term
    finally:
        follower.kill()
        follower.wait()
        os.unlink(f"{lab.manifests}/follow.yaml")


def test_malformed_objects_next_to_good_ones(lab):
    e1 = pod_ip(lab, "default/echo-1")
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    bad_svc = service("bad-svc", "10.96.201.2")
    bad_svc["spec"]["ports"][0]["port"] = "eighty"
    bad_slice = slice_("good", [endpoint("not-an-ip")], ports=ports, name="good-bad")
    write_manifest(
        lab,
        "mixed.yaml",
        [service("good", "10.96.201.1"), bad_svc, slice_("good", [endpoint(e1)], ports=ports), bad_slice],
    )
    write_manifest(lab, "broken.yaml", "kind: Service\nmetadata: {name: broken\n")
    wait_programmed(lab, "node1", "10.96.201.1:80/TCP", ready=1)
    assert probe(lab, "default/client", "tcp", "10.96.201.1", 80, count=5)["answers"] == {"echo-1": 5}
    assert "10.96.201.2:80/TCP" not in programmed(lab, "node1")
    time.sleep(0.5)
    log = lab.daemon_log("node1")
    assert "Service default/bad-svc" in log and "ports[0].port" in log
    assert "EndpointSlice default/good-bad" in log and "addresses[0]" in log
    assert "broken.yaml" in log
    # the rest of the dataplane kept working throughout
    vip = lab.state()["clusterIPs"]["default/echo"]
    assert len(probe(lab, "default/client", "tcp", vip, 80, count=30)["answers"]) == 3
    for name in ("mixed.yaml", "broken.yaml"):
        os.unlink(f"{lab.manifests}/{name}")


def test_restart_and_kill9_keep_long_lived_connections(lab):
    vip = lab.state()["clusterIPs"]["default/echo"]
    hold = lab.popen(
        "default/client",
        [sys.executable, "-m", "noded.lab.probe", "hold", vip, "80", "--seconds", "12", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    results = []
    while_down = []

    def new_connections_while_down():
        while_down.append(probe(lab, "default/client", "tcp", vip, 80, count=20))

    time.sleep(1)
    lab.restart_daemon("node1")  # graceful restart
    results.append(probe(lab, "default/client", "tcp", vip, 80, count=20))
    lab.stop_daemon("node1", signal.SIGKILL)  # kill -9 ...
    t = threading.Thread(target=new_connections_while_down)
    t.start()
    t.join()
    lab.start_daemon("node1")  # ... and start again
    lab.wait_ready("node1")
    results.append(probe(lab, "default/client", "tcp", vip, 80, count=20))
    out, _ = hold.communicate(timeout=30)
    held = json.loads(out)
    assert held["failures"] == [] and held["replies"] > 100
    for r in results + while_down:
        assert r["errors"] == {} and sum(r["answers"].values()) == 20
    if lab.mode == "ebpf":
        assert "recovered programmed frontends from pinned maps" in lab.daemon_log("node1")


def test_cli_views(lab):
    noded = [sys.executable, "-m", "noded"]
    status = json.loads(
        subprocess.run([*noded, "lab", "status", "-o", "json"], capture_output=True, text=True, check=True).stdout
    )
    assert {n["name"] for n in status["nodes"]} == {"node1", "node2"}
    assert {p["name"] for p in status["pods"]} >= {"echo-1", "client"}
    vip = echo_service(lab)
    wait_programmed(lab, "node2", f"{vip}:80/TCP", ready=3)
    status = json.loads(
        subprocess.run([*noded, "lab", "status", "-o", "json"], capture_output=True, text=True, check=True).stdout
    )
    assert any(s["clusterIPs"] == [vip] for s in status["services"])
    svcs = json.loads(
        netns.nsenter(
            "noded-node2",
            [*noded, "services", "-c", "/run/noded-lab/node2/config.yaml", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    echo = next(s for s in svcs if s["frontend"] == f"{vip}:80/TCP")
    assert len(echo["ready"]) == 3
    assert echo["service"] == "default/echo:http/TCP"  # named by the running daemon, in every mode
    ex = subprocess.run(
        [*noded, "lab", "exec", "default/client", "--", "cat", "/proc/self/cgroup"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "noded-lab/node1/pods/default_client" in ex.stdout


def _node1_state() -> tuple[str, bool]:
    attached = subprocess.run(
        ["bpftool", "cgroup", "show", "/sys/fs/cgroup/unified/noded-lab/node1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = netns.nsenter("noded-node1", ["nft", "list", "table", "inet", "noded"], capture_output=True)
    return attached, table.returncode == 0


def test_cleanup_then_down_leave_nothing(lab):
    attached, has_table = _node1_state()
    assert ("noded_connect4" in attached) == (lab.mode == "ebpf")
    assert has_table == (lab.mode == "nftables")  # starting in one mode leaves nothing of the other
    lab.stop_daemon("node1", signal.SIGKILL)
    netns.nsenter(
        "noded-node1", [sys.executable, "-m", "noded", "cleanup", "-c", "/run/noded-lab/node1/config.yaml"], check=True
    )
    assert _node1_state() == ("", False)
    assert not os.path.exists("/sys/fs/bpf/noded/node1")
    lab.down()
    progs = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True, check=True).stdout
    maps = subprocess.run(["bpftool", "map", "show"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["bpftool", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert "noded_" not in progs and "noded_" not in maps and "noded_" not in links
    assert not os.path.exists("/sys/fs/bpf/noded")
    assert not [
        n
        for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if n.startswith("noded-")
    ]
    assert not os.path.exists("/sys/fs/cgroup/unified/noded-lab")
    root = subprocess.run(["bpftool", "cgroup", "show", "/sys/fs/cgroup/unified"], capture_output=True, text=True)
    assert "noded" not in root.stdout
