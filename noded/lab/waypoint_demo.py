"""`noded lab demo --mesh --waypoint`: Istio ambient's waypoint scenario with no pod, on a two-node lab.

What `istioctl waypoint apply --enroll-namespace` writes (a Gateway `waypoint` of class istio-waypoint in
`default`, the namespace labelled `istio.io/use-waypoint=waypoint`), an HTTP echo in two versions (echo-v1 on
node2, echo-v2 on node1) behind the Service `echo` and one Service per version, `default/shell` and
`other/test` as clients. Then, as a user would see it: `curl echo` from shell shows the `X-Request-Id` the
waypoint added; an L7 AuthorizationPolicy (targetRefs the Gateway) allowing only `GET /` from shell refuses a
POST with 403 (`RBAC: access denied`) while the L4 policy on the echo pods admits the identity the waypoint
presents; an HTTPRoute splitting 90/10 between the versions is visible over 1,000 requests; and the node's
metrics count `istio_requests_total` by response code.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

from noded.lab.lab import Lab
from noded.lab.mesh_demo import AMBIENT, _apply, _wait
from noded.lab.workloads import end_demo, node_metrics, node_status, service_yaml, start_http_echo, wait_programmed

WAYPOINT_SA = "cluster.local/ns/default/sa/waypoint"
SHELL_SA = "cluster.local/ns/default/sa/shell"


def manifests() -> list[dict]:
    import yaml

    docs = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default", "labels": {**AMBIENT, "istio.io/use-waypoint": "waypoint"}},
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other", "labels": AMBIENT}},
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "default", "labels": {"istio.io/waypoint-for": "service"}},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "echo-l4", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "echo"}},
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": [SHELL_SA, WAYPOINT_SA]}}]}],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "echo-get-only", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"principals": [SHELL_SA]}}],
                        "to": [{"operation": {"methods": ["GET"], "paths": ["/"]}}],
                    }
                ],
            },
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "echo-canary", "namespace": "default"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
                "rules": [
                    {
                        "backendRefs": [
                            {"name": "echo-v1", "port": 80, "weight": 90},
                            {"name": "echo-v2", "port": 80, "weight": 10},
                        ],
                        "filters": [
                            {
                                "type": "ResponseHeaderModifier",
                                "responseHeaderModifier": {"add": [{"name": "x-routed-by", "value": "noded-waypoint"}]},
                            }
                        ],
                    }
                ],
            },
        },
    ]
    for name, selector in (("echo", {"app": "echo"}), ("echo-v1", {"version": "v1"}), ("echo-v2", {"version": "v2"})):
        docs.append(yaml.safe_load(service_yaml(name, selector, [("http", "TCP", 80, 8080)])))
    return docs


def curl(lab: Lab, pod: str, host: str, *args: str, timeout: float = 120) -> object:
    argv = [sys.executable, "-m", "noded.lab.httpclient", host, "80", "--namespace", pod.split("/")[0], *args]
    res = lab.run(pod, argv, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return json.loads(res.stdout)


def setup(lab: Lab) -> list[subprocess.Popen]:
    """The scenario on an up lab; the HTTP echo processes (kill them when done)."""
    servers = []
    _apply(lab, [d for d in manifests() if d["kind"] == "Namespace"])
    for pod, node, labels, account in (
        ("default/shell", "node1", {"app": "shell"}, "shell"),
        ("default/echo-v1", "node2", {"app": "echo", "version": "v1"}, "echo"),
        ("default/echo-v2", "node1", {"app": "echo", "version": "v2"}, "echo"),
        ("other/test", "node1", {"app": "test"}, "test"),
    ):
        lab.add_pod(pod, node, labels, service_account=account)
    for pod in ("default/echo-v1", "default/echo-v2"):
        servers.append(start_http_echo(lab, pod))
    _apply(lab, manifests())
    state = lab.state()
    for name, ready in (("echo", 2), ("echo-v1", 1), ("echo-v2", 1)):
        wait_programmed(lab, "node1", f"{state['clusterIPs'][f'default/{name}']}:80/TCP", ready=ready, timeout=30)
    for node in ("node1", "node2"):
        _wait(
            f"the waypoint's API on {node}",
            lambda n=node: (
                (w := node_status(lab, n).get("waypoint") or {}).get("waypoints") == ["default/waypoint"]
                and "default/echo-canary" in w.get("routes", [])
            ),
        )
        _wait(
            f"the policies on {node}",
            lambda n=node: (
                {"default/echo-l4", "default/echo-get-only"} <= set(node_status(lab, n)["tunnel"]["policies"])
            ),
        )
    wanted = {"node1": ["sa/shell", "sa/test", "sa/waypoint", "sa/echo"], "node2": ["sa/echo", "sa/waypoint"]}
    for node, ids in wanted.items():
        _wait(
            f"certificates on {node}",
            lambda n=node, i=ids: all(
                any(x in c["identity"] for c in node_status(lab, n)["tunnel"]["certificates"]) for x in i
            ),
        )
    return servers


def waypoint_demo(lab: Lab, keep: bool = False) -> int:
    print("== bringing up a 2-node lab: no networking pods, no waypoint pod; noded on each node")
    if not lab.is_up:
        lab.up(2, "ebpf")
    servers = []
    try:
        servers = setup(lab)
        print("== applied what `istioctl waypoint apply --enroll-namespace` writes: Gateway default/waypoint")
        print("   (class istio-waypoint), namespace default labelled istio.io/use-waypoint=waypoint;")
        print("   echo-v1 on node2, echo-v2 on node1, Services echo, echo-v1, echo-v2; shell and other/test on node1")
        first = curl(lab, "default/shell", "echo")[0]
        body = first.get("body") or {}
        rid = body.get("headers", {}).get("x-request-id") if isinstance(body, dict) else None
        print(f"== default/shell: curl echo -> {first.get('status')} from {body.get('name')}")
        print(f"   X-Request-Id the app received: {rid}")
        print(f"   X-Forwarded-For: {body.get('headers', {}).get('x-forwarded-for')}")
        post = curl(lab, "default/shell", "echo", "--method", "POST", "--body", "hello")[0]
        print(f"== default/shell: curl -X POST echo -> {post.get('status')} {post.get('body')!r}")
        other = curl(lab, "other/test", "echo.default")[0]
        print(f"== other/test: curl echo.default -> {other.get('status')} {other.get('body')!r}")
        print(
            "   (the L4 policy echo-l4 admits shell and the waypoint's identity; echo-get-only allows GET / from shell)"
        )
        started = time.monotonic()
        many = curl(lab, "default/shell", "echo", "--count", "1000", timeout=300)
        took = time.monotonic() - started
        split = collections.Counter(r["body"]["name"] for r in many if isinstance(r.get("body"), dict))
        print(f"== 1,000 requests on one connection in {took:.1f} s: {dict(split)} (HTTPRoute echo-canary: 90/10)")
        metrics = {}
        for node in ("node1", "node2"):
            for line in node_metrics(lab, node).splitlines():
                if line.startswith("istio_requests_total{"):
                    code = line.split('response_code="')[1].split('"')[0]
                    metrics[code] = metrics.get(code, 0) + float(line.rsplit(" ", 1)[1])
        print(f"== istio_requests_total by response_code, both nodes: {metrics}")
        v2 = split.get("echo-v2", 0)
        ok = (
            first.get("status") == 200
            and rid is not None
            and post.get("status") == 403
            and post.get("body") == "RBAC: access denied"
            and other.get("status") == 403
            and sum(split.values()) == 1000
            and 50 <= v2 <= 150
            and metrics.get("403", 0) >= 2
        )
        print("== verified: request IDs, L7 policy, canary split, request metrics" if ok else "== waypoint demo FAILED")
        return 0 if ok else 1
    finally:
        end_demo(lab, servers, keep)
