"""Kubernetes' own e2e cases for a node proxy and cluster DNS (test/e2e/network/service.go and dns.go),
translated into the 2-node lab and run in every services mode (the `lab` fixture's three).

The e2e suite creates objects through the API server and lets the controllers fill in the rest; here the
objects are written as the API server and the EndpointSlice controller would hold them (hand-written
slices where a case needs precise conditions). Each test names the e2e cases it translates. Cases the lab
already covers elsewhere, in the same three modes:

- "should allow pods to hairpin back to themselves through services": test_lab_external's
  test_pod_reaches_itself_through_its_service
- "should be able to create a functioning NodePort service", "should be possible to connect to a service
  via ExternalIP when the external IP is not assigned to a node", "should be rejected when no endpoints
  exist", "should respect internalTrafficPolicy=Local Pod to Pod", "should fail health check node port if
  there are only terminating endpoints": test_lab_external
- "should serve endpoints on same port and different protocols": test_lab_services'
  test_dns_to_a_service_of_its_own_reaches_that_server_and_cluster_dns_reaches_noded (53/UDP and 53/TCP)
- "should work after restarting kube-proxy": test_lab_services' test_restart_and_kill9_keep_long_lived_connections

Left to the components that own them (nothing a node proxy does): NodePort allocation and collisions
(the API server), publishNotReadyAddresses (the EndpointSlice controller marks such endpoints ready),
resolv.conf search paths and pod dnsConfig (the kubelet).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from noded.lab.workloads import probe, programmed, start_echo, wait_programmed
from tests.e2e.test_lab_external import node_address, peers
from tests.e2e.test_lab_services import pod_ip, write_manifest
from tests.objects import endpoint, service, slice_

HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def eventually(check, timeout: float = 5.0, interval: float = 0.1):
    """check()'s first truthy result within timeout; the last result's assertion otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def answers(lab, vip, port, count=20, pod="default/client", **opts):
    return probe(lab, pod, "tcp", vip, port, count=count, **opts)


def unreachable(lab, vip, port):
    out = answers(lab, vip, port, count=2, timeout=1)
    return not out["answers"]


def query(lab, pod, name, rdtype="A", server="10.96.0.10"):
    """(rcode, sorted answer texts) of one question from `pod` to the cluster DNS address."""
    code = (
        "import dns.message, dns.query, json, sys\n"
        f"r = dns.query.udp(dns.message.make_query({name!r}, {rdtype!r}), {server!r}, timeout=3)\n"
        "print(json.dumps([dns.rcode.to_text(r.rcode()), sorted(i.to_text() for a in r.answer for i in a)]))"
    )
    res = lab.run(pod, [sys.executable, "-c", code], timeout=20)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def resolves(lab, name, rdtype, expected):
    got = eventually(lambda: (r := query(lab, "default/client", name, rdtype)) == expected and r, timeout=5)
    return got or query(lab, "default/client", name, rdtype)


@pytest.fixture
def manifests(lab):
    """The manifest files a test writes, removed after it (the lab is shared by the module)."""
    written: list[str] = []

    def write(name: str, docs: list[dict]) -> None:
        write_manifest(lab, name, docs)
        written.append(name)

    yield write
    for name in written:
        path = f"{lab.manifests}/{name}"
        if os.path.exists(path):
            os.unlink(path)


# -- service.go -------------------------------------------------------------------------------------------
def test_serve_basic_and_multiport_endpoints_from_pods(lab, manifests):
    """ "should serve a basic endpoint from pods" and "should serve multiport endpoints from pods": one
    Service, two named ports whose pods listen on different ports (the controller writes one slice per
    port set: several slices merge), endpoints added and removed one by one."""
    e1, e2 = pod_ip(lab, "default/echo-1"), pod_ip(lab, "default/echo-2")
    extra = start_echo(lab, "default/echo-2", name="echo-2-port2", tcp=8081)
    try:
        vip = "10.96.220.1"
        svc = service(
            "multi-endpoint-test",
            vip,
            [
                {"name": "portname1", "port": 80, "targetPort": "svc1", "protocol": "TCP"},
                {"name": "portname2", "port": 81, "targetPort": "svc2", "protocol": "TCP"},
            ],
        )
        port1 = [{"name": "portname1", "port": 8080, "protocol": "TCP"}]
        port2 = [{"name": "portname2", "port": 8081, "protocol": "TCP"}]

        def slices(pod1: bool, pod2: bool) -> list[dict]:
            return [
                slice_("multi-endpoint-test", [endpoint(e1, node="node1")] if pod1 else [], port1, name="m-1"),
                slice_("multi-endpoint-test", [endpoint(e2, node="node2")] if pod2 else [], port2, name="m-2"),
            ]

        manifests("multi.yaml", [svc, *slices(False, False)])
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=0)
        manifests("multi.yaml", [svc, *slices(True, False)])
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready_ips=[e1])
        assert answers(lab, vip, 80)["answers"] == {"echo-1": 20}
        manifests("multi.yaml", [svc, *slices(True, True)])
        wait_programmed(lab, "node1", f"{vip}:81/TCP", ready_ips=[e2])
        assert answers(lab, vip, 80)["answers"] == {"echo-1": 20}
        assert answers(lab, vip, 81)["answers"] == {"echo-2-port2": 20}
        manifests("multi.yaml", [svc, *slices(False, True)])
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready_ips=[])
        assert answers(lab, vip, 80, count=3, timeout=2)["errors"] == {"Connection refused": 3}
        assert answers(lab, vip, 81)["answers"] == {"echo-2-port2": 20}
        manifests("multi.yaml", [svc, *slices(False, False)])
        wait_programmed(lab, "node1", f"{vip}:81/TCP", ready_ips=[])
        assert answers(lab, vip, 81, count=3, timeout=2)["errors"] == {"Connection refused": 3}
    finally:
        extra.kill()


def test_updated_after_adding_or_deleting_ports(lab, manifests):
    """ "should be updated after adding or deleting ports"."""
    e1 = pod_ip(lab, "default/echo-1")
    vip = "10.96.220.2"
    one = [{"name": "tcp-port", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    two = [*one, {"name": "tcp-port2", "port": 81, "targetPort": 8080, "protocol": "TCP"}]
    ports = [{"name": n, "port": 8080, "protocol": "TCP"} for n in ("tcp-port", "tcp-port2")]
    slice_doc = slice_("edit-ports", [endpoint(e1, node="node1")], ports)
    manifests("ports.yaml", [service("edit-ports", vip, one), slice_doc])
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1)
    assert f"{vip}:81/TCP" not in programmed(lab, "node1")
    manifests("ports.yaml", [service("edit-ports", vip, two), slice_doc])
    wait_programmed(lab, "node1", f"{vip}:81/TCP", ready=1)
    assert answers(lab, vip, 80)["answers"] == answers(lab, vip, 81)["answers"] == {"echo-1": 20}
    manifests("ports.yaml", [service("edit-ports", vip, two[1:]), slice_doc])
    assert eventually(lambda: f"{vip}:80/TCP" not in programmed(lab, "node1"))
    assert answers(lab, vip, 81)["answers"] == {"echo-1": 20}
    assert unreachable(lab, vip, 80)


def test_up_and_down_services_and_recreated(lab, manifests):
    """ "should be able to up and down services" and "should work after the service has been recreated":
    three services; one removed stops answering while the others keep theirs; recreated, it answers
    again (same VIP)."""
    e1, e2, e3 = (pod_ip(lab, f"default/echo-{i}") for i in (1, 2, 3))
    specs = {"service1": ("10.96.220.11", e1), "service2": ("10.96.220.12", e2), "service3": ("10.96.220.13", e3)}

    def docs(name):
        vip, ip = specs[name]
        return [service(name, vip), slice_(name, [endpoint(ip)], HTTP)]

    for name in specs:
        manifests(f"{name}.yaml", docs(name))
    for vip, _ in specs.values():
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1)
    expected = {"service1": "echo-1", "service2": "echo-2", "service3": "echo-3"}
    for name, (vip, _) in specs.items():
        assert answers(lab, vip, 80, count=5)["answers"] == {expected[name]: 5}
    os.unlink(f"{lab.manifests}/service1.yaml")
    assert eventually(lambda: "10.96.220.11:80/TCP" not in programmed(lab, "node1"))
    assert unreachable(lab, "10.96.220.11", 80)
    for name in ("service2", "service3"):
        assert answers(lab, specs[name][0], 80, count=5)["answers"] == {expected[name]: 5}
    manifests("service1.yaml", docs("service1"))
    wait_programmed(lab, "node1", "10.96.220.11:80/TCP", ready=1)
    assert answers(lab, "10.96.220.11", 80, count=5)["answers"] == {"echo-1": 5}


def test_source_pod_ip_preserved_through_cluster_ip(lab, manifests):
    """ "should preserve source pod IP for traffic thru service cluster IP": the backend sees the client
    pod's own address, from a pod on the same node and from a pod on the other node."""
    e1 = pod_ip(lab, "default/echo-1")
    vip = "10.96.220.3"
    manifests("sourceip.yaml", [service("sourceip-test", vip), slice_("sourceip-test", [endpoint(e1)], HTTP)])
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1)
    wait_programmed(lab, "node2", f"{vip}:80/TCP", ready=1)
    for client in ("default/client", "default/echo-3"):  # node1 (the backend's node) and node2
        out = answers(lab, vip, 80, count=3, pod=client, message="peer")
        assert peers(out) == {"echo-1": {pod_ip(lab, client)}}, client


def test_switch_session_affinity_and_its_timeout(lab, manifests):
    """ "should be able to switch session affinity for service with type clusterIP" and "should have
    session affinity timeout work for service with type clusterIP": ClientIP sticks to one backend, None
    spreads again, and a ClientIP affinity with a timeout lets go of its backend once the client was idle
    longer than timeoutSeconds (a new backend is drawn at random: rounds until a second one shows)."""
    vip = "10.96.220.4"
    eps = [endpoint(pod_ip(lab, f"default/echo-{i}")) for i in (1, 2, 3)]
    slice_doc = slice_("affinity", eps, HTTP)

    def write(**spec):
        manifests("affinity.yaml", [service("affinity", vip, **spec), slice_doc])

    write(sessionAffinity="ClientIP")
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=3)
    assert eventually(lambda: len(answers(lab, vip, 80)["answers"]) == 1)
    write(sessionAffinity="None")
    assert eventually(lambda: len(answers(lab, vip, 80, count=30)["answers"]) > 1)
    write(sessionAffinity="ClientIP")
    assert eventually(lambda: len(answers(lab, vip, 80)["answers"]) == 1)

    write(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 2}})
    time.sleep(3)  # the previous affinity's entries expire or are replaced
    seen = set()
    for _ in range(12):
        out = answers(lab, vip, 80, count=10)["answers"]
        assert len(out) == 1, out  # sticky within the timeout
        seen |= set(out)
        if len(seen) > 1:
            break
        time.sleep(3.0)  # idle past timeoutSeconds: the next connection is balanced again
    assert len(seen) > 1, seen


@pytest.mark.parametrize("label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"])
def test_service_proxy_name_and_headless_labels(lab, manifests, label):
    """ "should implement service.kubernetes.io/service-proxy-name" and "should implement
    service.kubernetes.io/headless": a Service so labelled (another proxy owns it; or the controller made
    it headless) is not proxied, nor are its slices; the label removed, it is; added back, it is gone."""
    e1 = pod_ip(lab, "default/echo-1")
    vip, fe = "10.96.220.5", "10.96.220.5:80/TCP"
    labelled = service("other-proxy", vip)
    labelled["metadata"]["labels"] = {label: "foo-bar" if label.endswith("name") else ""}
    plain = service("other-proxy", vip)
    slice_doc = slice_("other-proxy", [endpoint(e1)], HTTP)
    manifests("labelled.yaml", [labelled, slice_doc])
    manifests("control.yaml", [service("control", "10.96.220.6"), slice_("control", [endpoint(e1)], HTTP)])
    wait_programmed(lab, "node1", "10.96.220.6:80/TCP", ready=1)  # the same sync saw the labelled one
    assert fe not in programmed(lab, "node1") and fe not in programmed(lab, "node2")
    assert unreachable(lab, vip, 80)
    manifests("labelled.yaml", [plain, slice_doc])
    wait_programmed(lab, "node1", fe, ready=1)
    assert answers(lab, vip, 80, count=5)["answers"] == {"echo-1": 5}
    manifests("labelled.yaml", [labelled, slice_doc])
    assert eventually(lambda: fe not in programmed(lab, "node1"))
    assert unreachable(lab, vip, 80)


def test_terminating_endpoints_fallback(lab, manifests):
    """ "should fallback to terminating endpoints when there are no ready endpoints with
    internalTrafficPolicy=Cluster", "... with internalTrafficPolicy=Local" (the fallback is among the
    client node's endpoints) and "should not be able to connect to terminating and unready endpoints if
    PublishNotReadyAddresses is false" (not serving: refused)."""
    e1, e2 = pod_ip(lab, "default/echo-1"), pod_ip(lab, "default/echo-2")
    vip = "10.96.220.7"

    def write(eps, **spec):
        manifests("fallback.yaml", [service("fallback", vip, **spec), slice_("fallback", eps, HTTP)])

    serving_terminating = endpoint(e2, ready=False, serving=True, terminating=True, node="node2")
    gone = endpoint(e1, ready=False, serving=False, terminating=True, node="node1")
    write([serving_terminating, gone])
    assert eventually(lambda: answers(lab, vip, 80)["answers"] == {"echo-2": 20})

    # Local: node1's client may use node1's endpoints only; its one is terminating but serving
    local_terminating = endpoint(e1, ready=False, serving=True, terminating=True, node="node1")
    write([local_terminating, endpoint(e2, node="node2")], internalTrafficPolicy="Local")
    assert eventually(lambda: answers(lab, vip, 80)["answers"] == {"echo-1": 20})

    write([gone, endpoint(e2, ready=False, serving=False, terminating=True, node="node2")])
    assert eventually(lambda: answers(lab, vip, 80, count=3, timeout=2)["errors"] == {"Connection refused": 3})


def test_change_type_and_ports_then_release_node_port(lab, manifests):
    """ "should be able to change the type and ports of a TCP service" and "should release NodePorts on
    delete": ClusterIP → NodePort (reached from outside on every node) → another node port (the old one
    refused) → deleted (refused)."""
    e1, e2 = pod_ip(lab, "default/echo-1"), pod_ip(lab, "default/echo-2")
    vip = "10.96.220.8"
    slice_doc = slice_("mutability", [endpoint(e1, node="node1"), endpoint(e2, node="node2")], HTTP)
    manifests("mutability.yaml", [service("mutability", vip), slice_doc])
    wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=2)
    n1 = node_address(lab, "node1")

    def as_node_port(port):
        svc = service("mutability", vip, type="NodePort")
        svc["spec"]["ports"][0]["nodePort"] = port
        return [svc, slice_doc]

    manifests("mutability.yaml", as_node_port(32720))
    for node in ("node1", "node2"):
        wait_programmed(lab, node, f"{node_address(lab, node)}:32720/TCP", ready=2)
        out = probe(lab, "external", "tcp", node_address(lab, node), 32720, count=20)
        assert out["errors"] == {} and set(out["answers"]) == {"echo-1", "echo-2"}
    manifests("mutability.yaml", as_node_port(32721))
    wait_programmed(lab, "node1", f"{n1}:32721/TCP", ready=2)
    assert eventually(lambda: f"{n1}:32720/TCP" not in programmed(lab, "node1"))
    assert probe(lab, "external", "tcp", n1, 32721, count=5)["errors"] == {}
    assert probe(lab, "external", "tcp", n1, 32720, count=2, timeout=2)["errors"] == {"Connection refused": 2}
    assert answers(lab, vip, 80, count=5)["errors"] == {}  # the ClusterIP kept working throughout
    os.unlink(f"{lab.manifests}/mutability.yaml")
    assert eventually(lambda: f"{n1}:32721/TCP" not in programmed(lab, "node1"))
    assert probe(lab, "external", "tcp", n1, 32721, count=2, timeout=2)["errors"] == {"Connection refused": 2}


def kubernetes_service(apiserver_ip: str) -> list[dict]:
    """default/kubernetes as the API server writes it: 443 → the API servers' own addresses, no selector,
    a slice named `kubernetes` with no node name or target (host-network endpoints)."""
    svc = service("kubernetes", "10.96.0.1", [{"name": "https", "port": 443, "targetPort": 6443, "protocol": "TCP"}])
    svc["metadata"]["labels"] = {"component": "apiserver", "provider": "kubernetes"}
    eps = slice_("kubernetes", [endpoint(apiserver_ip)], [{"name": "https", "port": 6443, "protocol": "TCP"}])
    eps["metadata"]["name"] = "kubernetes"
    return [svc, eps]


def test_kubernetes_service_reaches_the_api_servers(lab, manifests):
    """ "should provide secure master service" / "should find the kubernetes service": default/kubernetes
    takes pods to the API server on a node's host network (port 6443 here: a stand-in server on node2),
    and "should provide DNS for the cluster": kubernetes.default.svc.cluster.local is its ClusterIP, the
    reverse name of that address is the service's."""
    server = start_echo(lab, "node/node2", name="apiserver", tcp=6443)
    try:
        manifests("kubernetes.yaml", kubernetes_service(node_address(lab, "node2")))
        wait_programmed(lab, "node1", "10.96.0.1:443/TCP", ready=1)
        assert answers(lab, "10.96.0.1", 443, count=5)["answers"] == {"apiserver": 5}
        assert resolves(lab, "kubernetes.default.svc.cluster.local.", "A", ["NOERROR", ["10.96.0.1"]]) == [
            "NOERROR",
            ["10.96.0.1"],
        ]
        ptr = query(lab, "default/client", "1.0.96.10.in-addr.arpa.", "PTR")
        assert ptr == ["NOERROR", ["kubernetes.default.svc.cluster.local."]]
    finally:
        server.kill()


# -- dns.go ---------------------------------------------------------------------------------------------------
def test_dns_for_services(lab, manifests):
    """ "should provide DNS for services": a ClusterIP service's A and SRV records, a headless service's A
    records (its ready endpoints) and SRV records naming each endpoint, in the pods' cluster DNS."""
    e1, e2 = pod_ip(lab, "default/echo-1"), pod_ip(lab, "default/echo-2")
    eps = [endpoint(e1, node="node1"), endpoint(e2, node="node2")]
    manifests(
        "dns-services.yaml",
        [
            service("dns-test-service", "10.96.220.9"),
            slice_("dns-test-service", eps, HTTP),
            service("headless-test", ["None"]),
            slice_("headless-test", eps, HTTP),
        ],
    )
    zone = "default.svc.cluster.local."
    expected = ["NOERROR", ["10.96.220.9"]]
    assert resolves(lab, f"dns-test-service.{zone}", "A", expected) == expected
    srv = ["NOERROR", [f"0 100 80 dns-test-service.{zone}"]]
    assert resolves(lab, f"_http._tcp.dns-test-service.{zone}", "SRV", srv) == srv
    expected = ["NOERROR", sorted([e1, e2])]
    assert resolves(lab, f"headless-test.{zone}", "A", expected) == expected
    rcode, records = query(lab, "default/client", f"_http._tcp.headless-test.{zone}", "SRV")
    assert rcode == "NOERROR"
    hosts = sorted(r.split()[3] for r in records)
    assert hosts == sorted(f"{ip.replace('.', '-')}.headless-test.{zone}" for ip in (e1, e2))
    assert all(r.split()[2] == "8080" for r in records)
    # no ready endpoint left: the headless name does not exist (the DNS spec; CoreDNS), fast path or not
    unready = [endpoint(e1, ready=False, node="node1")]
    manifests("dns-services.yaml", [service("headless-test", ["None"]), slice_("headless-test", unready, HTTP)])
    expected = ["NXDOMAIN", []]
    assert resolves(lab, f"headless-test.{zone}", "A", expected) == expected


def test_dns_for_pods_hostname_and_subdomain(lab, manifests):
    """ "should provide DNS for pods for Hostname" and "... for Subdomain": a pod with hostname and
    subdomain (a headless service of that name) is `<hostname>.<subdomain>.<ns>.svc`, from the endpoint's
    hostname the controller copies; and `<dashed-ip>.<ns>.pod` answers the pod's address."""
    e1 = pod_ip(lab, "default/echo-1")
    ep = endpoint(e1, node="node1")
    ep["hostname"] = "dns-querier-2"
    manifests("dns-pods.yaml", [service("dns-test-service-2", ["None"]), slice_("dns-test-service-2", [ep], HTTP)])
    expected = ["NOERROR", [e1]]
    name = "dns-querier-2.dns-test-service-2.default.svc.cluster.local."
    assert resolves(lab, name, "A", expected) == expected
    assert resolves(lab, f"{e1.replace('.', '-')}.default.pod.cluster.local.", "A", expected) == expected


def test_dns_for_external_name_services(lab, manifests):
    """ "should provide DNS for ExternalName services": a CNAME to externalName; changed, the new target;
    turned into a ClusterIP service, an A record."""
    zone = "default.svc.cluster.local."

    def external(target):
        svc = service("dns-test-service-3")
        svc["spec"] = {"type": "ExternalName", "externalName": target}
        return [svc]

    manifests("dns-external.yaml", external("foo.example.com"))
    expected = ["NOERROR", ["foo.example.com."]]
    assert resolves(lab, f"dns-test-service-3.{zone}", "CNAME", expected) == expected
    manifests("dns-external.yaml", external("bar.example.com"))
    expected = ["NOERROR", ["bar.example.com."]]
    assert resolves(lab, f"dns-test-service-3.{zone}", "CNAME", expected) == expected
    manifests("dns-external.yaml", [service("dns-test-service-3", "10.96.220.10")])
    expected = ["NOERROR", ["10.96.220.10"]]
    assert resolves(lab, f"dns-test-service-3.{zone}", "A", expected) == expected
