"""What users write for the waypoint, read as Istio and the Gateway API read it: enrollment (Gateway,
use-waypoint labels), protocol selection, HTTPRoute parsing and matching, L7 AuthorizationPolicy."""

from __future__ import annotations

import collections
import random

import pytest

from noded.tunnel.policy import Authorizer, Connection, Request
from noded.waypoint.registry import HTTP, HTTP2, TCP, Registry, Waypoint, protocol
from noded.waypoint.routes import RouteError, choose, parse_duration, parse_route


def gateway(name="waypoint", ns="default", cls="istio-waypoint"):
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": cls, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }


def namespace(name, labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def service(name, ns="default", labels=None, ports=None):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"ports": ports or [{"name": "http", "port": 80}]},
    }


def route(rules, name="r", parents=None, created=""):
    meta = {"name": name, "namespace": "default"}
    if created:
        meta["creationTimestamp"] = created
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {
            "parentRefs": parents or [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": rules,
        },
    }


def test_enrollment_as_istioctl_writes_it_namespace_service_and_opt_out():
    reg = Registry()
    reg.upsert(namespace("default", {"istio.io/use-waypoint": "waypoint"}))
    assert reg.waypoint_of("default", "echo") is None  # the Gateway does not exist yet
    assert "Namespace default" in reg.status()["unbound"]
    reg.upsert(gateway())
    assert reg.waypoint_of("default", "echo") == Waypoint("default", "waypoint")
    reg.upsert(service("db", labels={"istio.io/use-waypoint": "none"}))
    assert reg.waypoint_of("default", "db") is None
    reg.upsert(gateway("other-class", cls="istio"))
    reg.upsert(service("web", labels={"istio.io/use-waypoint": "other-class"}))
    assert reg.waypoint_of("default", "web") is None  # not a waypoint Gateway
    reg.upsert(service("x", ns="plain", labels={"istio.io/use-waypoint": "waypoint"}))
    assert reg.waypoint_of("plain", "x") is None  # no waypoint in its namespace
    reg.upsert(service("y", labels={"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "infra"}))
    assert reg.waypoint_of("default", "y") is None
    assert "not supported" in reg.status()["unbound"]["Service default/y"]
    reg.delete("Gateway", "default", "waypoint")
    assert reg.waypoint_of("default", "echo") is None
    assert Waypoint("default", "waypoint").identity("cluster.local") == "spiffe://cluster.local/ns/default/sa/waypoint"


@pytest.mark.parametrize(
    ("app", "name", "want"),
    [
        ("http", "tcp-x", HTTP),
        ("kubernetes.io/h2c", "", HTTP2),
        ("grpc", "", HTTP2),
        ("HTTPS", "http", TCP),
        (None, "http", HTTP),
        (None, "http-web", HTTP),
        (None, "http2-api", HTTP2),
        (None, "grpc-api", HTTP2),
        (None, "httpx", TCP),
        (None, "", TCP),
        (None, "tcp-db", TCP),
    ],
)
def test_protocol_is_chosen_the_way_istio_chooses_it(app, name, want):
    assert protocol(app, name) == want


def test_app_protocol_from_the_service_port():
    reg = Registry()
    reg.upsert(
        service("echo", ports=[{"name": "web", "port": 80, "appProtocol": "http"}, {"name": "db", "port": 5432}])
    )
    assert reg.protocol_of("default", "echo", 80, "web") == HTTP
    assert reg.protocol_of("default", "echo", 5432, "db") == TCP


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ([{"matches": [{"path": {"type": "Glob", "value": "/"}}]}], "spec.rules[0].matches[0].path.type"),
        ([{"matches": [{"path": {"value": "no-slash"}}]}], "spec.rules[0].matches[0].path.value"),
        (
            [{"matches": [{"path": {"type": "RegularExpression", "value": "(["}}]}],
            "spec.rules[0].matches[0].path.value",
        ),
        ([{"backendRefs": [{"name": "echo"}]}], "spec.rules[0].backendRefs[0].port"),
        ([{"backendRefs": [{"name": "echo", "port": 80, "weight": -1}]}], "spec.rules[0].backendRefs[0].weight"),
        ([{"backendRefs": [{"kind": "Pod", "name": "echo", "port": 80}]}], "spec.rules[0].backendRefs[0]"),
        ([{"filters": [{"type": "URLRewrite"}]}], "spec.rules[0].filters[0].type"),
        ([{"timeouts": {"request": "ten seconds"}}], "spec.rules[0].timeouts.request"),
        ([{"retry": {"attempts": 99}}], "spec.rules[0].retry.attempts"),
        ([{"sessionPersistence": {}}], "spec.rules[0].sessionPersistence"),
        (
            [
                {
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "a b", "value": "x"}]},
                        }
                    ]
                }
            ],
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
        ),
        (
            [
                {
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"add": [{"name": "a", "value": "x\r\ny"}]},
                        }
                    ]
                }
            ],
            "spec.rules[0].filters[0].requestHeaderModifier.add[0].value",
        ),
    ],
)
def test_a_malformed_route_is_rejected_naming_the_field(rules, field):
    with pytest.raises(RouteError) as e:
        parse_route(route(rules))
    assert str(e.value).startswith(field)


def test_a_route_needs_a_service_parent_and_is_rejected_alone_with_a_readable_status():
    reg = Registry()
    assert reg.upsert(route([{}], name="good")) is True
    bad = route([{}], name="bad", parents=[{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "x"}])
    assert reg.upsert(bad) is False
    assert reg.upsert({"kind": "HTTPRoute", "metadata": {"name": "junk", "namespace": "default"}, "spec": "x"}) is False
    status = reg.status()
    assert status["routes"] == ["default/good"]
    assert "only a Service parent" in status["rejected"]["HTTPRoute default/bad"]
    assert status["rejected"]["HTTPRoute default/junk"] == "spec: expected a mapping"
    assert [r.name for r in reg.routes_for("default", "echo", 80)] == ["good"]
    assert reg.routes_for("default", "echo", 8080) == []  # parentRef names port 80


def test_durations():
    assert parse_duration("10s", "t") == 10
    assert parse_duration("1m30s", "t") == 90
    assert parse_duration("250ms", "t") == 0.25
    with pytest.raises(RouteError):
        parse_duration("10", "t")


def test_matching_follows_the_gateway_api_precedence():
    r = parse_route(
        route(
            [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": "root", "port": 80}],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                    "backendRefs": [{"name": "api", "port": 80}],
                },
                {
                    "matches": [{"path": {"type": "Exact", "value": "/api/v1"}}],
                    "backendRefs": [{"name": "exact", "port": 80}],
                },
                {
                    "matches": [{"path": {"value": "/api"}, "headers": [{"name": "X-Canary", "value": "yes"}]}],
                    "backendRefs": [{"name": "canary", "port": 80}],
                },
                {
                    "matches": [
                        {"path": {"value": "/q"}, "method": "POST", "queryParams": [{"name": "debug", "value": "1"}]}
                    ],
                    "backendRefs": [{"name": "debug", "port": 80}],
                },
            ]
        )
    )

    def to(path, method="GET", query=None, headers=None):
        return choose([r], method, path, query or {}, headers or {}).rule.backends[0].name

    assert to("/") == "root"
    assert to("/apix") == "root"  # prefixes match whole segments
    assert to("/api/users") == "api"
    assert to("/api/v1") == "exact"
    assert to("/api/x", headers={"x-canary": "yes"}) == "canary"
    assert to("/q", "POST", {"debug": "1"}) == "debug"
    assert to("/q", "GET", {"debug": "1"}) == "root"
    none = parse_route(route([{"matches": [{"path": {"type": "Exact", "value": "/only"}}]}]))
    assert choose([none], "GET", "/other", {}, {}).status == 404
    assert choose([], "GET", "/", {}, {}).rule is None  # no route: the Service itself


def test_the_older_route_wins_a_tie():
    old = parse_route(route([{"backendRefs": [{"name": "old", "port": 80}]}], name="z", created="2026-01-01T00:00:00Z"))
    new = parse_route(route([{"backendRefs": [{"name": "new", "port": 80}]}], name="a", created="2026-06-01T00:00:00Z"))
    assert choose([new, old], "GET", "/", {}, {}).route == "default/z"


def test_weights_split_the_traffic_and_zero_weights_send_nowhere():
    r = parse_route(
        route([{"backendRefs": [{"name": "v1", "port": 80, "weight": 90}, {"name": "v2", "port": 80, "weight": 10}]}])
    )
    rng = random.Random(7)
    counts = collections.Counter(r.rules[0].pick(rng).name for _ in range(10_000))
    assert 0.085 < counts["v2"] / 10_000 < 0.115
    zero = parse_route(route([{"backendRefs": [{"name": "v1", "port": 80, "weight": 0}]}]))
    assert zero.rules[0].pick() is None


def test_header_modifiers_and_default_retries():
    r = parse_route(
        route(
            [
                {
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {
                                "set": [{"name": "X-Env", "value": "canary"}],
                                "add": [{"name": "X-Tag", "value": "b"}],
                                "remove": ["X-Secret"],
                            },
                        }
                    ],
                    "timeouts": {"request": "2s"},
                }
            ]
        )
    )
    rule = r.rules[0]
    got = rule.request_headers.apply([("x-env", "prod"), ("X-Tag", "a"), ("x-secret", "s"), ("host", "echo")])
    assert got == [("X-Tag", "a"), ("host", "echo"), ("X-Env", "canary"), ("X-Tag", "b")]
    assert rule.timeout == 2 and rule.retries == 2 and rule.retry_codes == (503,)


# -- L7 AuthorizationPolicy -------------------------------------------------------------------------
def policy(name, spec, ns="default"):
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def request_conn(method="GET", path="/", headers=None, principal="cluster.local/ns/default/sa/shell", host="echo"):
    return Connection(
        "default", {}, 80, "10.0.0.9", "10.96.0.20", principal, True, Request(method, host, path, headers or {})
    )


def test_l7_policy_targeting_the_waypoint_allows_only_get_slash():
    auth = Authorizer()
    auth.upsert(
        policy(
            "get-only",
            {
                "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                "action": "ALLOW",
                "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/"]}}]}],
            },
        )
    )
    assert auth.check_waypoint(request_conn("GET", "/"), "waypoint", "echo").allowed
    assert not auth.check_waypoint(request_conn("POST", "/"), "waypoint", "echo").allowed
    assert not auth.check_waypoint(request_conn("GET", "/admin"), "waypoint", "echo").allowed
    assert auth.check_waypoint(request_conn("POST", "/"), "other-waypoint", "echo").allowed  # not targeted
    # at L4 the targeted policy is the waypoint's: the tunnel's check leaves it out
    l4 = Connection("default", {"app": "echo"}, 80, "10.0.0.9", "10.244.1.5", "cluster.local/ns/default/sa/shell")
    assert auth.check(l4).allowed and auth.check(l4).policy is None


def test_l7_fields_prefix_suffix_hosts_headers_sources():
    auth = Authorizer()
    auth.upsert(
        policy(
            "svc",
            {
                "targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                "rules": [
                    {
                        "from": [{"source": {"namespaces": ["default"]}}],
                        "to": [
                            {
                                "operation": {
                                    "paths": ["/api/*", "*.png"],
                                    "hosts": ["echo.default.svc.cluster.local", "echo"],
                                }
                            }
                        ],
                        "when": [{"key": "request.headers[X-Team]", "values": ["blue", "green*"]}],
                    }
                ],
            },
        )
    )
    ok = {"x-team": "greenish"}
    assert auth.check_waypoint(request_conn(path="/api/x", headers=ok), "waypoint", "echo").allowed
    assert auth.check_waypoint(request_conn(path="/logo.png", headers=ok, host="ECHO:80"), "waypoint", "echo").allowed
    assert not auth.check_waypoint(request_conn(path="/api/x", headers={"x-team": "red"}), "waypoint", "echo").allowed
    assert not auth.check_waypoint(request_conn(path="/api/x"), "waypoint", "echo").allowed  # header absent
    assert not auth.check_waypoint(request_conn(path="/other", headers=ok), "waypoint", "echo").allowed
    assert not auth.check_waypoint(request_conn(path="/api/x", headers=ok, host="evil"), "waypoint", "echo").allowed
    other_ns = request_conn(path="/api/x", headers=ok, principal="cluster.local/ns/other/sa/test")
    assert not auth.check_waypoint(other_ns, "waypoint", "echo").allowed


def test_deny_wins_and_what_cannot_be_checked_fails_closed():
    auth = Authorizer()
    auth.upsert(
        policy(
            "deny-admin",
            {
                "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
            },
        )
    )
    auth.upsert(
        policy(
            "jwt",
            {
                "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                "action": "ALLOW",
                "rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}],
            },
        )
    )
    assert not auth.check_waypoint(request_conn(path="/admin/x"), "waypoint", "echo").allowed
    assert not auth.check_waypoint(request_conn(path="/"), "waypoint", "echo").allowed  # the ALLOW cannot match


def test_a_broken_targeted_policy_fails_closed_for_the_waypoint_only():
    auth = Authorizer()
    assert not auth.upsert(policy("bad", {"targetRefs": [{"kind": "Pod", "name": "x"}], "action": "DENY"}))
    assert not auth.check_waypoint(request_conn(), "waypoint", "echo").allowed  # every waypoint request in default
    l4 = Connection("default", {"app": "echo"}, 80, "10.0.0.9", "10.244.1.5", "cluster.local/ns/default/sa/shell")
    assert auth.check(l4).allowed  # L4 keeps working
    assert not auth.upsert(
        policy("both", {"selector": {"matchLabels": {"app": "x"}}, "targetRefs": [{"kind": "Service", "name": "x"}]})
    )
    assert "selector and targetRefs" in auth.rejected["default/both"]


def test_the_daemons_sink_feeds_the_registry_and_rejects_a_bad_route_alone():
    from noded.model.hub import Hub
    from noded.model.pods import Enrollment
    from noded.model.tracker import ServiceModel

    sink = Hub(ServiceModel(), Enrollment())
    sink.upsert(namespace("default", {"istio.io/use-waypoint": "waypoint"}))
    sink.upsert(gateway())
    assert sink.upsert(route([{"backendRefs": [{"name": "v1", "port": 80}]}], name="good"))
    assert not sink.upsert(route([{"filters": [{"type": "Mirror"}]}], name="bad"))
    assert sink.rejected_by_kind["HTTPRoute"] == 1
    assert "spec.rules[0].filters[0].type" in sink.last_rejected["HTTPRoute default/bad"]
    assert sink.waypoints.waypoint_of("default", "echo") == Waypoint("default", "waypoint")
    assert [r.name for r in sink.waypoints.routes_for("default", "echo", 80)] == ["good"]
    sink.upsert(service("echo", labels={"istio.io/use-waypoint": "none"}))
    assert sink.waypoints.waypoint_of("default", "echo") is None
    assert sink.model.counts()[0] == 1  # the Service reached the model too
    sink.delete("Gateway", "default", "waypoint")
    assert sink.waypoints.waypoints() == []


def test_a_node_is_issued_the_waypoint_identity_only_where_it_runs_an_enrolled_pod_of_its_namespace():
    from noded.config import TunnelConfig
    from noded.model.pods import Enrollment
    from noded.tunnel.service import IdentityService

    enrollment = Enrollment("node1")
    enrollment.upsert(namespace("default", {"istio.io/dataplane-mode": "ambient"}))
    for name, node in (("shell", "node1"), ("db", "node2")):
        enrollment.upsert(
            {
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": node, "serviceAccountName": name},
                "status": {"podIP": "10.244.1.5"},
            }
        )
    reg = Registry()
    reg.upsert(gateway())
    reg.upsert(gateway("elsewhere", ns="other"))
    identities = IdentityService(TunnelConfig(), "node1", enrollment, loop=None, waypoints=reg)
    assert identities.wanted() == {
        "spiffe://cluster.local/ns/default/sa/shell",
        "spiffe://cluster.local/ns/default/sa/waypoint",
    }
    assert "spiffe://cluster.local/ns/other/sa/elsewhere" not in identities.wanted("node2")


def test_noded_status_shows_the_waypoint_and_what_it_rejected():
    from noded.cli import render_status

    out = render_status(
        {
            "waypoint": {
                "waypoints": ["default/waypoint"],
                "routes": ["default/r"],
                "rejected": {"HTTPRoute default/bad": "spec.rules[0].filters[0].type: 'Mirror' is not supported"},
                "unbound": {"Namespace shop": "istio.io/use-waypoint=wp: no Gateway of class istio-waypoint"},
                "connections": 3,
                "requests": 7,
                "denied": 1,
                "refused": 0,
            }
        }
    )
    assert "default/waypoint; 1 routes; 3 connections, 7 requests, 1 denied" in out
    assert "HTTPRoute default/bad: spec.rules[0].filters[0].type" in out
    assert "Namespace shop: istio.io/use-waypoint=wp" in out
