"""Issue 21: the waypoint in the 2-node lab, as `noded lab demo --mesh --waypoint` sets it up (a Gateway of
class istio-waypoint, the namespace enrolled with istio.io/use-waypoint, echo-v1 on node2, echo-v2 on node1,
shell and other/test as clients): enrollment and opting out, HTTP handling (request IDs, forwarding headers,
keep-alive, WebSocket, garbage), L7 AuthorizationPolicy, HTTPRoute routing (split, matches, header changes,
timeouts, retries, rejected routes) and per-request telemetry (access log and istio_requests_total)."""

from __future__ import annotations

import collections
import json
import sys
import time
import uuid

import pytest
import yaml

from noded.lab.mesh_demo import _apply, _wait
from noded.lab.waypoint_demo import curl, setup
from noded.lab.workloads import (
    node_metrics,
    node_status,
    service_yaml,
    start_http_echo,
    start_server,
    wait_programmed,
)
from tests.e2e.conftest import fresh_lab
from tests.e2e.test_lab_services import pod_ip


@pytest.fixture(scope="module")
def lab():
    lab = fresh_lab()
    servers = []
    try:
        servers = setup(lab)
        yield lab
    finally:
        for s in servers:
            s.kill()
        lab.down()


def get(lab, path="/", pod="default/shell", host="echo", *args):
    return curl(lab, pod, host, "--path", path, *args)[0]


def test_a_request_through_the_waypoint_gets_a_request_id_and_forwarding_headers(lab):
    first = get(lab)
    assert first["status"] == 200, first
    headers = first["body"]["headers"]
    assert uuid.UUID(headers["x-request-id"]).version == 4
    assert headers["x-forwarded-for"] == pod_ip(lab, "default/shell")
    assert headers["x-forwarded-proto"] == "http"
    assert first["headers"]["x-routed-by"] == "noded-waypoint"  # the route's ResponseHeaderModifier
    kept = get(lab, "/", "default/shell", "echo", "--header", "X-Request-Id: from-the-client")
    assert kept["body"]["headers"]["x-request-id"] == "from-the-client"
    # the access log line of that request, on the node whose waypoint served it
    deadline = time.monotonic() + 10
    while not any("request_id=from-the-client" in _log(lab, n) for n in ("node1", "node2")):
        assert time.monotonic() < deadline, "no access log line for the request"
        time.sleep(0.2)
    line = next(
        ln for n in ("node1", "node2") for ln in _log(lab, n).splitlines() if "request_id=from-the-client" in ln
    )
    for field in (
        "method=GET",
        "authority=echo",
        "path=/",
        "response_code=200",
        "duration_ms=",
        "source=spiffe://cluster.local/ns/default/sa/shell",
        "destination=spiffe://cluster.local/ns/default/sa/echo",
    ):
        assert field in line, line


def _log(lab, node):
    with open(f"{lab.node_dir(node)}/noded.log", errors="replace") as f:
        return f.read()


def test_l7_policy_refuses_a_post_with_403_while_get_passes(lab):
    post = get(lab, "/", "default/shell", "echo", "--method", "POST", "--body", "hello")
    assert post["status"] == 403 and post["body"] == "RBAC: access denied"
    assert get(lab, "/admin")["status"] == 403  # only GET / is allowed
    other = curl(lab, "other/test", "echo.default")[0]
    assert other["status"] == 403  # not shell: the L7 policy's source principal
    assert get(lab)["status"] == 200


def test_an_httproute_split_of_90_10_is_visible_over_1000_requests(lab):
    answers = curl(lab, "default/shell", "echo", "--count", "1000", timeout=300)
    names = collections.Counter(a["body"]["name"] for a in answers if a.get("status") == 200)
    assert sum(names.values()) == 1000, collections.Counter(str(a.get("status") or a.get("error")) for a in answers)
    assert 60 <= names["echo-v2"] <= 140, names  # 10 % of 1,000: binomial sd 9.5


def test_header_matches_timeouts_retries_and_a_rejected_route(lab):
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "echo-by-header", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [
                {
                    "matches": [
                        {
                            "path": {"type": "PathPrefix", "value": "/"},
                            "headers": [{"name": "x-canary", "value": "yes"}],
                        }
                    ],
                    "backendRefs": [{"name": "echo-v2", "port": 80}],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-env", "value": "canary"}]},
                        }
                    ],
                    "timeouts": {"request": "5s"},
                },
            ],
        },
    }
    bad = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "echo"}], "rules": [{"filters": [{"type": "URLRewrite"}]}]},
    }
    _apply(lab, [route, bad])
    for node in ("node1", "node2"):
        _wait(
            f"the rejected route on {node}",
            lambda n=node: "HTTPRoute default/broken" in node_status(lab, n)["waypoint"]["rejected"],
        )
    status = node_status(lab, "node1")["waypoint"]
    assert "spec.rules[0].filters[0].type" in status["rejected"]["HTTPRoute default/broken"]
    deadline = time.monotonic() + 10
    while "default/echo-by-header" not in node_status(lab, "node1")["waypoint"]["routes"] or (
        "default/echo-by-header" not in node_status(lab, "node2")["waypoint"]["routes"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # the header match is more specific than echo-canary's split: it always wins; the rest still splits
    canaries = curl(lab, "default/shell", "echo", "--header", "x-canary: yes", "--count", "20")
    assert {a["body"]["name"] for a in canaries} == {"echo-v2"}
    assert {a["body"]["headers"].get("x-env") for a in canaries} == {"canary"}
    plain = curl(lab, "default/shell", "echo", "--count", "20")
    assert "echo-v1" in {a["body"]["name"] for a in plain}
    assert {a["body"]["headers"].get("x-env") for a in plain} == {None}


def test_a_503_is_retried_as_istio_retries_by_default(lab):
    # a failing version behind its own Service: the default retries cannot save it, a good backend can
    lab.add_pod("default/broken", "node2", {"app": "broken"}, service_account="echo")
    server = start_http_echo(lab, "default/broken", status=503)
    try:
        _apply(lab, service_yaml("broken", {"app": "broken"}, [("http", "TCP", 80, 8080)]))
        vip = lab.state()["clusterIPs"]["default/broken"]
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1, timeout=30)
        before = _attempts(lab)
        answer = curl(lab, "default/shell", "broken")[0]
        assert answer["status"] == 503
        deadline = time.monotonic() + 5  # the access log is written in batches
        while _attempts(lab) - before < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _attempts(lab) - before == 3  # the first try and Istio's default 2 retries
    finally:
        server.kill()


def _attempts(lab):
    """Backend attempts the access log shows for requests to default/broken, both nodes."""
    lines = [ln for n in ("node1", "node2") for ln in _log(lab, n).splitlines()]
    return sum(
        int(ln.split("attempts=")[1].split()[0]) for ln in lines if "destination_service=default/broken:80" in ln
    )


def test_a_websocket_upgrade_passes_through(lab):
    out = curl(lab, "default/shell", "echo", "--websocket", "--path", "/")  # the policy allows GET / only
    assert out["status"] == 101 and out["echoed"] == "HELLO THROUGH THE WAYPOINT\n", out


def test_garbage_gets_400_and_the_waypoint_serves_the_next_client(lab):
    out = curl(lab, "default/shell", "echo", "--raw", "\\x16\\x03\\x01garbage\\r\\n\\r\\n")
    assert out["raw"].startswith("HTTP/1.1 400") and "connection: close" in out["raw"], out
    assert get(lab)["status"] == 200


def test_opting_a_service_out_and_tcp_ports_stay_on_the_l4_path(lab):
    doc = yaml.safe_load(service_yaml("echo-direct", {"version": "v1"}, [("http", "TCP", 80, 8080)]))
    doc["metadata"]["labels"] = {"istio.io/use-waypoint": "none"}
    tcp = yaml.safe_load(service_yaml("echo-tcp", {"version": "v1"}, [("tcp-echo", "TCP", 80, 8080)]))
    _apply(lab, [doc, tcp])
    for name in ("echo-direct", "echo-tcp"):
        vip = lab.state()["clusterIPs"][f"default/{name}"]
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1, timeout=30)
        answer = get(lab, "/", "default/shell", name)
        assert answer["status"] == 200 and answer["body"]["name"] == "echo-v1"
        assert "x-request-id" not in answer["body"]["headers"]  # no waypoint on the way
        post = get(lab, "/", "default/shell", name, "--method", "POST")
        assert post["status"] == 200  # the L7 policy is the waypoint's: not applied on the L4 path


def test_request_metrics_count_by_response_code(lab):
    get(lab, "/", "default/shell", "echo", "--method", "DELETE")  # a 403
    totals = collections.Counter()
    durations = 0
    for node in ("node1", "node2"):
        for line in node_metrics(lab, node).splitlines():
            if line.startswith("istio_requests_total{") and 'reporter="waypoint"' in line:
                code = line.split('response_code="')[1].split('"')[0]
                totals[code] += float(line.rsplit(" ", 1)[1])
                assert 'source_workload="shell"' in line or 'source_workload="test"' in line, line
            if line.startswith("istio_request_duration_milliseconds_count{"):
                durations += float(line.rsplit(" ", 1)[1])
    assert totals["200"] >= 1000 and totals["403"] >= 1 and totals["503"] >= 1, totals
    assert durations == sum(totals.values())


def test_grpc_through_the_waypoint_with_trailers_and_the_l7_policy(lab):
    """A real grpcio client (shell) and server (grpc-echo on node2) on a Service port with appProtocol grpc:
    HTTP/2 through the waypoint, the request ID in the trailers the server sent back; the gRPC paths allowed
    for shell by a policy targeting the Service, and refused for other/test (PERMISSION_DENIED)."""

    lab.add_pod("default/grpc-echo", "node2", {"app": "grpc-echo"}, service_account="grpc")
    server = start_server(
        lab, "default/grpc-echo", "noded.lab.grpcecho", "serve", "--name", "grpc-echo", "--port", "9090"
    )
    try:
        svc = yaml.safe_load(service_yaml("grpc-echo", {"app": "grpc-echo"}, [("rpc", "TCP", 80, 9090)]))
        svc["spec"]["ports"][0]["appProtocol"] = "grpc"
        policy = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "grpc-from-shell", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "Service", "group": "", "name": "grpc-echo"}],
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"principals": ["cluster.local/ns/default/sa/shell"]}}],
                        "to": [{"operation": {"methods": ["POST"], "paths": ["/echo.Echo/*"]}}],
                    }
                ],
            },
        }
        _apply(lab, [svc, policy])
        vip = lab.state()["clusterIPs"]["default/grpc-echo"]
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1, timeout=30)
        for node in ("node1", "node2"):
            _wait(
                f"the policy on {node}",
                lambda n=node: "default/grpc-from-shell" in node_status(lab, n)["tunnel"]["policies"],
            )
        _wait(  # the new pod's identity: until it is issued, its 15008 has no certificate to present
            "grpc-echo's certificate",
            lambda: any("sa/grpc" in c["identity"] for c in node_status(lab, "node2")["tunnel"]["certificates"]),
        )

        def grpc_call(pod):
            res = lab.run(pod, [sys.executable, "-m", "noded.lab.grpcecho", "call", vip, "80"], timeout=60)
            assert res.returncode == 0, res.stderr
            return json.loads(res.stdout)

        ok = grpc_call("default/shell")
        assert ok["code"] == "OK", ok
        assert ok["answer"] == "grpc-echo:hello" and ok["stream"] == ["s-0", "s-1", "s-2"]
        assert uuid.UUID(ok["trailers"]["x-request-id-seen"]).version == 4  # added by the waypoint
        refused = grpc_call("other/test")
        assert refused["code"] == "PERMISSION_DENIED", refused
        grpc_lines = [
            line
            for line in node_metrics(lab, "node2").splitlines()
            if line.startswith("istio_requests_total{") and 'destination_service_name="grpc-echo"' in line
        ]
        assert any('request_protocol="grpc"' in ln and 'grpc_response_status="0"' in ln for ln in grpc_lines), (
            grpc_lines
        )
    finally:
        server.kill()


def test_a_mesh_pod_reaches_a_node_port_in_ebpf_mode(lab):
    """A mesh pod's own connects keep their address for its capture (noded_mesh_netns); the capture's dial to
    an address that is not a cluster IP (its own node's node port here) is the tunnel's socket, which the
    socket LB still translates, so the pod gets there as before."""
    lab.add_pod("default/np-backend", "node2", {"app": "np-backend"}, service_account="np")
    server = start_http_echo(lab, "default/np-backend")
    try:
        doc = yaml.safe_load(service_yaml("echo-np", {"app": "np-backend"}, [("tcp-web", "TCP", 80, 8080)]))
        doc["spec"]["type"] = "NodePort"
        _apply(lab, [doc])
        node_port = lab.state()["nodePorts"]["default/echo-np/tcp-web/TCP"]
        node1 = lab.state()["nodes"]["node1"]["address"]  # shell's own node: its socket LB must translate it
        wait_programmed(lab, "node1", f"{node1}:{node_port}/TCP", ready=1, timeout=30)
        res = lab.run(
            "default/shell",
            [sys.executable, "-m", "noded.lab.httpclient", node1, str(node_port), "--namespace", "default"],
            timeout=60,
        )
        answer = json.loads(res.stdout)[0]
        assert answer.get("status") == 200 and answer["body"]["name"] == "np-backend", answer
    finally:
        server.kill()
