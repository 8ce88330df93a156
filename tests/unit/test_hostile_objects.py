"""Every input is hostile: a malformed object of any kind is rejected alone and never stops the objects
around it (issue 17, items 3 and 4). Property tests mutate valid objects of every kind the daemon reads at
random places with random JSON and feed them next to good ones, through the daemon's own sink, asserting
that nothing escapes and nothing else changes; then the same through the API source."""

from __future__ import annotations

import contextlib
import copy
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from noded.model.hub import Hub
from noded.model.pods import Enrollment
from noded.model.tracker import ServiceModel
from noded.sources import kube
from noded.sources.kubeclient import ApiClient
from noded.tunnel.policy import Authorizer, Connection, parse_policy
from tests.objects import endpoint, service, slice_
from tests.unit.test_kube_source import wait_for

NODE = "node1"
ECHO = "cluster.local/ns/default/sa/echo"


def pod(name: str, namespace: str = "default", labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": {"nodeName": NODE, "serviceAccountName": name, "hostNetwork": False},
        "status": {"podIP": "10.244.1.9", "podIPs": [{"ip": "10.244.1.9"}]},
    }


def namespace(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def node(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "a"}},
    }


def policy(name: str, namespace: str = "default", spec: dict | None = None) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec
        if spec is not None
        else {
            "action": "ALLOW",
            "selector": {"matchLabels": {"app": "db"}},
            "rules": [
                {
                    "from": [{"source": {"principals": [ECHO], "ipBlocks": ["10.0.0.0/8"]}}],
                    "to": [{"operation": {"ports": ["5432"]}}],
                    "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}],
                }
            ],
        },
    }


# The objects every example starts from: one good object of each kind, in namespace `good`.
GOOD = [
    namespace("good", {"istio.io/dataplane-mode": "ambient"}),
    service("web", "10.96.0.50", namespace="good"),
    slice_("web", [endpoint("10.244.1.2")], namespace="good"),
    pod("db", "good", {"app": "db"}),
    policy("db-allow", "good"),
    node(NODE),
]
# Valid objects of every kind, elsewhere, to mutate.
BASES = [
    service("svc", "10.96.0.60", namespace="other", type="LoadBalancer", externalTrafficPolicy="Local"),
    slice_("svc", [endpoint("10.244.1.3"), endpoint("10.244.1.4", ready=False)], namespace="other"),
    pod("p", "other"),
    namespace("other", {"istio.io/dataplane-mode": "ambient"}),
    node("node2"),
    policy("pol", "other"),
    policy(
        "deny", "other", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}]}]}
    ),
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["²", "٣", "10.0.0.0/33", "-1", "65536", "\n flush ruleset", "*", "", "::ffff:1.2.3.4"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in obj a value sits (dict keys and list indexes)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw) -> dict:
    obj = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(obj)[1:]))
        target = obj
        for step in where[:-1]:
            target = target[step]
        if where[:1] == ("kind",):
            continue  # the kind picks the owner; a wrong kind is another object altogether
        target[where[-1]] = draw(json_values)
    meta = obj.get("metadata")
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    assume(ns not in ("good", "istio-system"))  # a mutant is another namespace's object, not a good one
    assume(not (obj.get("kind") == "Node" and isinstance(meta, dict) and meta.get("name") == NODE))
    return obj


def fresh_sink() -> Hub:
    sink = Hub(ServiceModel(node_name=NODE), Enrollment(NODE), Authorizer())
    for obj in GOOD:
        assert sink.upsert(copy.deepcopy(obj)), obj["kind"]
    return sink


def observed(sink: Hub) -> tuple:
    """What the good objects make the node do."""
    decision = sink.policies.check(Connection("good", {"app": "db"}, 5432, "10.1.2.3", "10.244.1.9", ECHO))
    other = sink.policies.check(Connection("good", {"app": "db"}, 5432, "10.1.2.3", "10.244.1.9", "x/ns/y/sa/z"))
    return (
        sink.model.frontends_of(("good", "web")),
        sink.enrollment.enrolled("good", "db"),
        decision.allowed,
        other.allowed,
        sink.model.node_zone,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(mutated(), min_size=1, max_size=4))
def test_mutated_objects_of_every_kind_are_rejected_alone(objects):
    sink = fresh_sink()
    before = observed(sink)
    for obj in objects:
        sink.upsert(obj)  # never raises, whatever the object
        sink.delete(str(obj.get("kind")), "other", "svc")
    assert observed(sink) == before


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_the_policy_parser_raises_nothing_but_policy_error(obj):
    from noded.tunnel.policy import PolicyError

    if obj.get("kind") != "AuthorizationPolicy":
        return
    with contextlib.suppress(PolicyError):  # and nothing else
        parse_policy(obj)


@pytest.mark.parametrize("port", ["²", "٣", "0", "65536", "1e3", " 80"])
def test_a_port_that_passes_isdigit_but_not_int_is_a_policy_error(port):
    """Issue 17, item 3: "²".isdigit() is True and int("²") raises ValueError, which escaped the parser."""
    bad = policy("bad", "default", {"rules": [{"to": [{"operation": {"ports": [port]}}]}]})
    auth = Authorizer()
    assert not auth.upsert(bad)
    assert "ports[0]" in auth.rejected["default/bad"]


def test_an_unreadable_when_value_is_caught_when_parsed_not_when_a_connection_is_decided():
    bad = policy("bad", "default", {"rules": [{"when": [{"key": "source.ip", "values": ["not-an-ip"]}]}]})
    auth = Authorizer()
    assert not auth.upsert(bad)
    assert "when[0].values[0]" in auth.rejected["default/bad"]
    auth.check(Connection("default", {}, 80, "10.0.0.1"))  # no ValueError at decision time


# -- failing closed (issue 17, item 4) ------------------------------------------------------------
def to_db(principal=ECHO, port=5432, labels_known=True):
    return Connection("good", {"app": "db"} if labels_known else {}, port, "10.1.2.3", "", principal, labels_known)


def test_a_deny_with_one_bad_value_denies_everything_it_selects():
    auth = Authorizer()
    auth.upsert(policy("db-allow", "good"))
    assert auth.check(to_db()).allowed
    bad_deny = policy(
        "no-evil", "good", {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}
    )
    assert not auth.upsert(bad_deny)
    decision = auth.check(to_db())
    assert not decision.allowed and decision.policy == "good/no-evil"
    assert auth.check(Connection("elsewhere", {}, 80, "10.1.2.3")).allowed  # another namespace: untouched


def test_an_allow_with_a_typo_allows_nothing():
    auth = Authorizer()
    typo = policy("only-echo", "good", {"selector": {"matchLabels": {"app": "db"}}, "rules": [{"form": []}]})
    assert not auth.upsert(typo)
    assert not auth.check(to_db()).allowed  # the workload's only ALLOW is broken: closed, not open to all
    assert auth.check(Connection("good", {"app": "web"}, 80, "10.1.2.3")).allowed  # not selected


def test_an_update_that_breaks_a_policy_replaces_it_failing_closed_and_a_fix_restores_it():
    auth = Authorizer()
    auth.upsert(policy("db-allow", "good"))
    broken = policy("db-allow", "good", {"selector": {"matchLabels": {"app": "db"}}, "rules": "all"})
    assert not auth.upsert(broken)
    assert not auth.check(to_db()).allowed
    assert auth.upsert(policy("db-allow", "good"))
    assert auth.check(to_db()).allowed and "good/db-allow" not in auth.rejected


def test_a_destination_whose_labels_are_not_known_yet_is_denied_when_policies_select_by_label():
    auth = Authorizer()
    auth.upsert(policy("deny-all-db", "good", {"action": "DENY", "selector": {"matchLabels": {"app": "db"}}}))
    assert not auth.check(to_db(labels_known=False)).allowed  # was: selector cannot apply -> allowed
    assert auth.check(Connection("other", {}, 80, "10.1.2.3", labels_known=False)).allowed  # no policy there


# -- through the API source ------------------------------------------------------------------------
def start(api, sink):
    kinds = ("Service", "EndpointSlice", "Node", "Pod", "Namespace", "AuthorizationPolicy")
    src = kube.KubeSource(ApiClient(api.url), sink, kinds=kinds, max_backoff=0.3, node_name=NODE)
    src.start()
    return src


def test_a_policy_that_broke_the_parser_does_not_stop_the_source_from_syncing(api):
    """Issue 17, item 3: the watch retried the same event forever; on a first list the source never synced
    and nothing was programmed."""
    api.put(service("web", "10.96.0.50"))
    api.put(slice_("web", [endpoint("10.244.1.2")]))
    api.put(policy("bad", "default", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["²"]}}]}]}))
    sink = Hub(ServiceModel(node_name=NODE), Enrollment(NODE), Authorizer())
    src = start(api, sink)
    try:
        wait_for(lambda: src.synced and src.kind_synced("AuthorizationPolicy"))
        assert sink.model.frontends_of(("default", "web"))
        assert not sink.policies.check(Connection("default", {}, 80, "10.1.2.3")).allowed  # bad DENY: closed
        api.put(policy("bad2", "default", {"rules": [{"when": [{"key": "source.ip", "values": ["x"]}]}]}))
        api.put(service("web2", "10.96.0.51"))  # a later event on the same watch path still arrives
        wait_for(lambda: "default/bad2" in sink.policies.rejected)
        wait_for(lambda: bool(sink.model.frontends_of(("default", "web2"))))
    finally:
        src.stop()


def test_a_404_on_policies_after_the_first_sync_keeps_them(api):
    """Issue 17, item 4a: the CRD briefly absent while an API server restarts emptied every policy."""
    api.put(policy("deny-db", "default", {"action": "DENY", "rules": [{}]}))  # an empty rule matches all
    sink = Hub(ServiceModel(node_name=NODE), Enrollment(NODE), Authorizer())
    src = start(api, sink)
    try:
        wait_for(lambda: src.synced and "default/deny-db" in sink.policies.policies)
        api.hidden.add("/apis/security.istio.io/v1/authorizationpolicies")
        hidden_at = len(api.requests)
        api.drop_watches()
        wait_for(lambda: any("authorizationpolicies" in r for r in api.requests[hidden_at:]))  # answered 404
        time.sleep(0.3)
        assert "default/deny-db" in sink.policies.policies
        assert not sink.policies.check(Connection("default", {}, 80, "10.1.2.3")).allowed
    finally:
        src.stop()
