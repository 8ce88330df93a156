"""Capture through the real CNI chain (bridge + host-local + noded-cni) in the 2-node lab."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from noded.api import h2client
from noded.files import write_atomic
from noded.lab import cni, netns
from noded.lab.workloads import AMBIENT, mesh_pods, node_status, pod_capture, probe, wait_programmed
from tests.e2e.conftest import dig, echo_service, fresh_lab
from tests.e2e.test_lab_services import pod_ip, write_manifest


@pytest.fixture(scope="module")
def lab():
    lab = fresh_lab()
    servers = []
    try:
        servers = mesh_pods(lab)
        yield lab
    finally:
        for s in servers:
            s.kill()
        lab.down()


def test_enrolled_pod_outbound_goes_through_15001_and_reaches_its_target(lab):
    target = pod_ip(lab, "default/echo-2")
    out = probe(lab, "default/mesh-client", "tcp", target, 8080, count=3)
    assert out["answers"] == {"echo-2": 3}
    info = pod_capture(lab, "default/mesh-client")
    assert info["enrolled"] is True and info["listening"] is True
    outbound = [r for r in info["recent"] if r["direction"] == "outbound"]
    assert [r["original"] for r in outbound] == [f"{target}:8080"] * 3
    # through a service VIP too (in eBPF mode the socket LB has already chosen the backend)
    vip = echo_service(lab)
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=2)
    out = probe(lab, "default/mesh-client", "tcp", vip, 80, count=4)
    assert out["errors"] == {} and sum(out["answers"].values()) == 4


def test_inbound_to_an_enrolled_pod_goes_through_15006(lab):
    target = pod_ip(lab, "default/mesh-echo")
    out = probe(lab, "default/plain-client", "tcp", target, 8080, count=2)
    assert out["answers"] == {"mesh-echo": 2}
    inbound = [r for r in pod_capture(lab, "default/mesh-echo")["recent"] if r["direction"] == "inbound"]
    assert [r["original"] for r in inbound] == [f"{target}:8080"] * 2


def test_non_enrolled_pod_tcp_is_untouched_and_its_dns_answered_by_the_node(lab):
    out = probe(lab, "default/plain-client", "tcp", pod_ip(lab, "default/echo-1"), 8080, count=2)
    assert out["answers"] == {"echo-1": 2}
    info = pod_capture(lab, "default/plain-client")
    assert info["enrolled"] is False and info["recent"] == []
    vip = echo_service(lab)
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=2)
    for pod in ("default/plain-client", "default/mesh-client"):
        # the cluster DNS address (the pods' nameserver), UDP and TCP: answered by the node's resolver from the
        # watched Services, though no service has that address
        assert dig(lab, pod, "echo.default.svc.cluster.local.") == ["NOERROR", [vip]]
        assert dig(lab, pod, "ECHO.default.svc.cluster.local.", tcp=True) == ["NOERROR", [vip]]
        assert dig(lab, pod, "nope.default.svc.cluster.local.")[0] == "NXDOMAIN"
        # over IPv6 too (the node holds fd96::a as it holds 10.96.0.10)
        for tcp in (False, True):
            assert dig(lab, pod, "echo.default.svc.cluster.local.", server="fd96::a", tcp=tcp) == [
                "NOERROR",
                [vip],
            ]
        # any other address is the pod's own business: not intercepted (a pod with no DNS server behind it)
        with pytest.raises(AssertionError, match=r"Timeout|Error"):
            dig(lab, pod, "echo.default.svc.cluster.local.", server=pod_ip(lab, "default/echo-1"))


def test_with_the_node_not_serving_the_cluster_dns_address_the_pods_capture_takes_it_to_15053(lab):
    """dns.serveClusterDNS: false (another DNS owns the address): ztunnel's in-pod contract, DNS to the
    cluster DNS addresses redirected to the pod's own 15053 listener, for enrolled pods and (dnsForAllPods)
    the others; the node gives the address back. Then the default again."""
    vip = echo_service(lab)
    node = lab.state()["nodes"]["node1"]
    with open(node["config"]) as f:
        original = f.read()
    config = yaml.safe_load(original)
    config["dns"]["serveClusterDNS"] = False
    write_atomic(node["config"], yaml.safe_dump(config))
    try:
        lab.restart_daemon("node1")
        lab.wait_ready("node1")
        deadline = time.monotonic() + 10
        while "10.96.0.10" in netns.nsenter(node["netns"], ["ip", "addr"], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "the node kept the cluster DNS address"
            time.sleep(0.1)
        for pod in ("default/plain-client", "default/mesh-client"):
            while "redirect to :15053" not in lab.run(pod, ["nft", "list", "table", "inet", "noded-capture"]).stdout:
                assert time.monotonic() < deadline, pod
                time.sleep(0.1)
            assert dig(lab, pod, "echo.default.svc.cluster.local.") == ["NOERROR", [vip]]
    finally:
        write_atomic(node["config"], original)
        lab.restart_daemon("node1")
        lab.wait_ready("node1")
    deadline = time.monotonic() + 10
    listing = ["nft", "list", "table", "inet", "noded-capture"]
    while "redirect to :15053" in lab.run("default/mesh-client", listing).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert dig(lab, "default/plain-client", "echo.default.svc.cluster.local.") == ["NOERROR", [vip]]


def daemon_fds(lab, node):
    return len(os.listdir(f"/proc/{lab.daemon_pid(node)}/fd"))


def test_a_pod_calling_its_own_capture_listeners_is_refused_and_the_node_keeps_serving(lab):
    """A pod (enrolled or DNS-only) connecting to its own 127.0.0.1:15001 or :15006 used to be dialed again
    from the proxy, landing on itself until the daemon ran out of file descriptors (issue 17, item 1)."""
    vip = echo_service(lab)
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=2)
    fds_before = daemon_fds(lab, "node1")
    code = (
        "import json, socket, sys\n"
        "out = {}\n"
        "for host, port in (('127.0.0.1', 15001), ('127.0.0.1', 15006), ('::1', 15001)):\n"
        "    try:\n"
        "        s = socket.create_connection((host, port), timeout=3)\n"
        "        s.sendall(b'hello\\n' * 100)\n"
        "        out[f'{host}:{port}'] = 'closed' if s.recv(100) == b'' else 'answered'\n"
        "    except OSError as e:\n"
        "        out[f'{host}:{port}'] = type(e).__name__\n"
        "print(json.dumps(out))"
    )
    for pod in ("default/mesh-client", "default/plain-client"):
        for _ in range(3):
            res = lab.run(pod, [sys.executable, "-c", code], timeout=30)
            assert res.returncode == 0, res.stderr
            outcome = json.loads(res.stdout)
            assert set(outcome.values()) <= {"closed", "ConnectionResetError", "ConnectionRefusedError"}, outcome
    time.sleep(0.5)
    assert daemon_fds(lab, "node1") < fds_before + 50  # the loop took thousands
    # the node still serves DNS and the VIP for everyone
    assert dig(lab, "default/plain-client", "echo.default.svc.cluster.local.") == ["NOERROR", [vip]]
    assert sum(probe(lab, "default/mesh-client", "tcp", vip, 80, count=5)["answers"].values()) == 5


def test_node_local_listener_answers_pods_and_the_node_untracked_and_refuses_others(lab):
    vip = echo_service(lab)
    name = "echo.default.svc.cluster.local."
    # a pod's query reaching 169.254.20.10 itself: the node knows its namespace from its address
    for tcp in (False, True):
        assert dig(lab, "default/plain-client", name, "169.254.20.10", tcp, uncaptured=True) == ["NOERROR", [vip]]
    shortcut = dig(
        lab, "default/plain-client", "echo.default.default.svc.cluster.local.", "169.254.20.10", uncaptured=True
    )
    assert shortcut == ["NOERROR", [name, vip]]  # search-path shortcut: CNAME + A in one answer
    # the same through the in-pod capture (15053)
    assert dig(lab, "default/mesh-client", "echo.default.default.svc.cluster.local.")[1] == [name, vip]
    # the node itself; the queries are NOTRACK (a counter of untracked DNS packets in a table of the test's)
    count_untracked = (
        "table inet notracktest {\n chain c {\n type filter hook input priority 0;\n"
        " ip daddr 169.254.20.10 udp dport 53 ct state untracked counter\n }\n}\n"
    )
    node_ns = "/run/netns/noded-node1"
    subprocess.run(["nsenter", f"--net={node_ns}", "nft", "-f", "-"], input=count_untracked, text=True, check=True)
    try:
        assert dig(lab, "node/node1", name, "169.254.20.10") == ["NOERROR", [vip]]
        listed = subprocess.run(
            ["nsenter", f"--net={node_ns}", "nft", "list", "table", "inet", "notracktest"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "counter packets 1 " in listed, listed
    finally:
        subprocess.run(["nsenter", f"--net={node_ns}", "nft", "delete", "table", "inet", "notracktest"], check=True)
    # a host that is neither the node nor one of its pods: REFUSED, no data
    node1 = lab.state()["nodes"]["node1"]["address"]
    subprocess.run(
        ["nsenter", "--net=/run/netns/noded-external", "ip", "route", "add", "169.254.20.10/32", "via", node1],
        check=True,
    )
    try:
        assert dig(lab, "external", name, "169.254.20.10") == ["REFUSED", []]
    finally:
        subprocess.run(
            ["nsenter", "--net=/run/netns/noded-external", "ip", "route", "del", "169.254.20.10/32"], check=True
        )


def test_pod_queries_to_the_node_local_address_are_answered_by_the_fast_path(lab):
    vip = echo_service(lab)
    name = "echo.default.svc.cluster.local."
    deadline = time.monotonic() + 10
    while not (node_status(lab, "node1")["dns"]["fastPath"] or {}).get("records"):
        assert time.monotonic() < deadline, node_status(lab, "node1")["dns"]
        time.sleep(0.1)
    before = node_status(lab, "node1")["dns"]
    # the in-pod capture leaves 169.254.20.10 alone: the query crosses the pod's veth to the bridge
    for pod in ("default/plain-client", "default/mesh-client"):
        assert dig(lab, pod, name, "169.254.20.10") == ["NOERROR", [vip]]
    after = node_status(lab, "node1")["dns"]
    assert after["fastPath"]["answered"] - before["fastPath"]["answered"] == 2
    assert after["queries"] == before["queries"]  # the resolver never saw them
    # what the fast path does not hold still reaches the resolver, by the same address
    assert dig(lab, "default/plain-client", "nope.default.svc.cluster.local.", "169.254.20.10")[0] == "NXDOMAIN"
    assert node_status(lab, "node1")["dns"]["queries"] == after["queries"] + 1


def test_the_dns_fast_path_keeps_answering_while_the_daemon_is_down(lab):
    vip = echo_service(lab)
    name = "echo.default.svc.cluster.local."
    assert dig(lab, "default/plain-client", name, "169.254.20.10") == ["NOERROR", [vip]]
    lab.stop_daemon("node1", signal.SIGKILL)
    try:  # its pinned map and link answer without it
        assert dig(lab, "default/plain-client", name, "169.254.20.10") == ["NOERROR", [vip]]
    finally:
        lab.start_daemon("node1")
        lab.wait_ready("node1")
    assert dig(lab, "default/plain-client", name, "169.254.20.10") == ["NOERROR", [vip]]


def test_nodes_hold_certificates_for_the_identities_of_their_enrolled_pods_only(lab):
    def identities(node):
        return [c["identity"] for c in node_status(lab, node)["tunnel"]["certificates"]]

    deadline = time.monotonic() + 15
    while identities("node1") != ["spiffe://cluster.local/ns/default/sa/default"]:
        assert time.monotonic() < deadline, node_status(lab, "node1")["tunnel"]
        time.sleep(0.2)
    assert identities("node2") == []  # echo-2 there is not enrolled
    assert node_status(lab, "node1")["tunnel"]["issuer"].startswith("local, serving")  # node1 holds the CA key
    assert node_status(lab, "node2")["tunnel"]["issuer"].startswith("remote")  # node2 asks it


def wait_enrolled(lab, pod, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while pod_capture(lab, pod)["enrolled"] is not want:
        assert time.monotonic() < deadline, f"{pod} never became enrolled={want}"
        time.sleep(0.1)


def test_relabelling_the_namespace_enrolls_and_unenrolls_running_pods(lab):
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {}}}
    write_manifest(lab, "ns-shop.yaml", [namespace])
    lab.add_pod("shop/cart", "node1")
    target = f"{pod_ip(lab, 'default/echo-1')}:8080"
    assert pod_capture(lab, "shop/cart")["enrolled"] is False
    namespace["metadata"]["labels"] = AMBIENT
    write_manifest(lab, "ns-shop.yaml", [namespace])
    wait_enrolled(lab, "shop/cart", True)
    assert probe(lab, "shop/cart", "tcp", *target.split(":"), count=1)["answers"] == {"echo-1": 1}
    assert [r["original"] for r in pod_capture(lab, "shop/cart")["recent"]] == [target]
    namespace["metadata"]["labels"] = {}
    write_manifest(lab, "ns-shop.yaml", [namespace])
    wait_enrolled(lab, "shop/cart", False)
    assert probe(lab, "shop/cart", "tcp", *target.split(":"), count=1)["answers"] == {"echo-1": 1}
    # no capture left: the node answers its DNS (dns.serveClusterDNS), so it needs no DNS-only capture either
    info = pod_capture(lab, "shop/cart")
    assert info["recent"] == [] and not info["listening"]
    assert lab.run("shop/cart", ["nft", "list", "table", "inet", "noded-capture"]).returncode != 0


def test_del_removes_everything_and_is_idempotent(lab):
    lab.add_pod("default/short", "node1", AMBIENT)
    state = lab.state()
    pod, node = state["pods"]["default/short"], state["nodes"]["node1"]
    inv = lab._invocation(pod)
    conflist = lab.conflist(node)
    cni.delete(conflist, inv, lab.cni_path, node["netns"], pod["cniResult"])
    assert pod_capture(lab, "default/short")["ok"] is False
    nft = lab.run("default/short", ["nft", "list", "table", "inet", "noded-capture"])
    assert nft.returncode != 0  # the table is gone
    listening = lab.run("default/short", ["ss", "-Hltn"]).stdout
    assert "15001" not in listening and "15006" not in listening
    cni.delete(conflist, inv, lab.cni_path, node["netns"], pod["cniResult"])  # twice
    cni.delete(conflist, cni.Invocation(inv.container_id, ""), lab.cni_path, node["netns"])  # without netns
    lab.stop_daemon("node1")
    try:
        cni.delete(conflist, inv, lab.cni_path, node["netns"], pod["cniResult"])  # daemon stopped
    finally:
        lab.start_daemon("node1")
        lab.wait_ready("node1")
    lab.delete_pod("default/short")


def test_restarted_daemon_repairs_its_pods(lab):
    lab.restart_daemon("node1")
    lab.wait_ready("node1")
    deadline = time.monotonic() + 10
    while not pod_capture(lab, "default/mesh-client")["listening"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    target = pod_ip(lab, "default/echo-2")
    assert probe(lab, "default/mesh-client", "tcp", target, 8080, count=1)["answers"] == {"echo-2": 1}


def test_fifty_pods_added_in_parallel_all_come_up(lab):
    node = lab.state()["nodes"]["node2"]
    conflist = lab.conflist(node)
    # as in a cluster, the Pod objects exist before the runtime sets the pods up (noded refuses unknown ones)
    write_manifest(lab, "bulk-pods.yaml", [bulk_pod(f"p{i}") for i in range(50)])
    invs = []
    for i in range(50):
        name = f"noded-pod-bulk-{i}"
        netns.create(name)
        invs.append(
            cni.Invocation(
                f"bulk-{i}", f"/run/netns/{name}", args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bulk;K8S_POD_NAME=p{i}"
            )
        )
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda inv: cni.add(conflist, inv, lab.cni_path, node["netns"]), invs))
        assert len({cni.result_ips(r)[0] for r in results}) == 50
        for inv in invs:  # each one known to its node (not enrolled: nothing to capture)
            info = h2client.call(lab.api_socket("node2"), "/noded.v1.Noded/PodInfo", {"containerId": inv.container_id})
            assert info["ok"] and info["enrolled"] is False, info
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda inv: cni.delete(conflist, inv, lab.cni_path, node["netns"]), invs))
    finally:
        for inv in invs:
            netns.remove(inv.netns_path.rsplit("/", 1)[1])
        os.unlink(f"{lab.manifests}/bulk-pods.yaml")


def bulk_pod(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "bulk"},
        "spec": {"nodeName": "node2"},
    }


def test_full_cleanup_removes_the_capture_from_live_pods_and_a_restart_puts_it_back(lab):
    node = lab.state()["nodes"]["node1"]
    pods = [key for key, p in lab.state()["pods"].items() if p["node"] == "node1" and pod_capture(lab, key)["enrolled"]]
    assert pods and all(lab.run(pod, ["nft", "list", "table", "inet", "noded-capture"]).returncode == 0 for pod in pods)
    lab.stop_daemon("node1")
    try:
        out = netns.nsenter(
            node["netns"],
            [sys.executable, "-m", "noded", "cleanup", "-c", node["config"]],
            capture_output=True,
            text=True,
        ).stdout
        for pod in pods:
            assert lab.run(pod, ["nft", "list", "table", "inet", "noded-capture"]).returncode != 0, pod
            assert "100" not in lab.run(pod, ["ip", "rule"]).stdout  # the reply-routing rule went with it
        assert sum("noded-capture and routes in" in line for line in out.splitlines()) == len(pods)
    finally:
        lab.start_daemon("node1")
        lab.wait_ready("node1")
    # the pods are still alive: the next start captures them again
    deadline = time.monotonic() + 10
    while not all(lab.run(pod, ["nft", "list", "table", "inet", "noded-capture"]).returncode == 0 for pod in pods):
        assert time.monotonic() < deadline
        time.sleep(0.2)
