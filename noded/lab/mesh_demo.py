"""`noded lab demo --mesh`: the podless Kubernetes + ambient scenario on a two-node lab.

`shell` (node1) and `echo` (node2) in `default`, a `test` workload in `other`, both namespaces enrolled
with `istio.io/dataplane-mode=ambient`, an AuthorizationPolicy allowing only the `default/shell` identity
to reach echo. `curl echo` from shell goes through the node-local DNS, the service VIP, the tunnel (HBONE,
mTLS) and comes back with echo's answer; the same from `other` is refused. It prints what it verified.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import yaml

from noded.lab.lab import Lab
from noded.lab.workloads import end_demo, node_status, pod_capture, service_yaml, start_echo, wait_programmed

AMBIENT = {"istio.io/dataplane-mode": "ambient"}

# a small `curl NAME` inside a pod: the pod's search path resolved by the node-local DNS, then HTTP GET
CURL = """
import json, sys, urllib.request, dns.message, dns.query, dns.rcode
name, ns = sys.argv[1], sys.argv[2]
for suffix in (f"{ns}.svc.cluster.local", "svc.cluster.local", "cluster.local", ""):
    q = dns.message.make_query(f"{name}.{suffix}".rstrip(".") + ".", "A")
    r = dns.query.udp(q, "169.254.20.10", timeout=3)
    addrs = [a.address for rr in r.answer for a in rr if hasattr(a, "address")]
    if addrs:
        break
try:
    body = urllib.request.urlopen(f"http://{addrs[0]}/", timeout=5).read().decode().strip()
except Exception as e:
    body = None
    error = type(e).__name__ + ": " + str(e)
print(json.dumps({"name": q.question[0].name.to_text(), "address": addrs[0], "body": body,
                  "error": None if body is not None else error}))
"""


def _curl(lab: Lab, pod: str, name: str) -> dict:
    res = lab.run(pod, [sys.executable, "-c", CURL, name, pod.split("/")[0]], timeout=60)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return json.loads(res.stdout)


def _apply(lab: Lab, docs: list[dict] | str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(docs if isinstance(docs, str) else yaml.safe_dump_all(docs))
    lab.apply(f.name)
    os.unlink(f.name)


def _wait(what: str, check, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def mesh_demo(lab: Lab, keep: bool = False) -> int:
    print("== bringing up a 2-node lab: no networking pods, noded on each node")
    if not lab.is_up:
        lab.up(2, "ebpf")
    servers = []
    try:
        namespaces = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": AMBIENT}}
            for ns in ("default", "other")
        ]
        _apply(lab, namespaces)
        print("== namespaces default and other labelled istio.io/dataplane-mode=ambient")
        for pod, node, labels, account in (
            ("default/shell", "node1", {"app": "shell"}, "shell"),
            ("default/echo", "node2", {"app": "echo"}, "echo"),
            ("other/test", "node1", {"app": "test"}, "test"),
        ):
            p = lab.add_pod(pod, node, labels, service_account=account)
            print(f"   pod {pod:<14} on {node}, service account {account}: {p['ips'][0]}")
        servers.append(start_echo(lab, "default/echo", tcp=8080))
        _apply(lab, service_yaml("echo", {"app": "echo"}, [("http", "TCP", 80, 8080)]))
        vip = lab.state()["clusterIPs"]["default/echo"]
        wait_programmed(lab, "node1", f"{vip}:80/TCP", ready=1)
        print(f"== service default/echo: ClusterIP {vip}")
        _apply(
            lab,
            [
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "AuthorizationPolicy",
                    "metadata": {"name": "echo-from-shell", "namespace": "default"},
                    "spec": {
                        "selector": {"matchLabels": {"app": "echo"}},
                        "action": "ALLOW",
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/shell"]}}]}],
                    },
                }
            ],
        )
        _wait(
            "the policy on node2", lambda: "default/echo-from-shell" in node_status(lab, "node2")["tunnel"]["policies"]
        )
        print("== AuthorizationPolicy default/echo-from-shell: ALLOW app=echo from cluster.local/ns/default/sa/shell")
        wanted = {"node1": ["default/sa/shell", "other/sa/test"], "node2": ["default/sa/echo"]}
        for node, ids in wanted.items():
            _wait(
                f"certificates on {node}",
                lambda n=node, i=ids: all(
                    any(x in c["identity"] for c in node_status(lab, n)["tunnel"]["certificates"]) for x in i
                ),
            )
            certs = node_status(lab, node)["tunnel"]["certificates"]
            print(f"   {node} holds: {', '.join(c['identity'] + ' (until ' + c['notAfter'][:19] + ')' for c in certs)}")

        allowed = _curl(lab, "default/shell", "echo")
        print(f"== default/shell: curl echo -> {allowed['name']} = {allowed['address']}, answer {allowed['body']!r}")
        inbound = [r for r in pod_capture(lab, "default/echo")["recent"] if r["direction"] == "hbone"]
        seen = inbound[-1] if inbound else {}
        print(
            f"   echo's node took it over HBONE (mTLS) from {seen.get('peer')},"
            f" verified identity {seen.get('peer_identity')}"
        )
        denied = _curl(lab, "other/test", "echo.default")
        print(f"== other/test: curl echo.default -> {denied['address']}: {denied['error'] or denied['body']}")
        tunnel = node_status(lab, "node2")["tunnel"]
        print(f"   node2's tunnel: {tunnel['hbone_in']} HBONE connections in, {tunnel['denied']} denied by policy")
        ok = (
            allowed["address"] == vip
            and allowed["body"] == "echo"
            and seen.get("peer_identity") == "spiffe://cluster.local/ns/default/sa/shell"
            and denied["body"] is None
            and tunnel["denied"] >= 1
        )
        print(
            "== verified: DNS name -> service VIP -> tunnel with mTLS between nodes -> echo for default/shell;"
            " refused for other/test"
            if ok
            else "== mesh demo FAILED"
        )
        return 0 if ok else 1
    finally:
        end_demo(lab, servers, keep)
