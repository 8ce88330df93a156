"""AuthorizationPolicy at L4, as Istio documents its evaluation: a matrix by namespace, principal, port and
IP block; DENY before ALLOW; no ALLOW policy means allow; L7 rules fail closed; bad policies rejected alone."""

from __future__ import annotations

import pytest

from noded.tunnel.policy import Authorizer, Connection, PolicyError, parse_policy

SHELL = "cluster.local/ns/default/sa/shell"
OTHER = "cluster.local/ns/other/sa/test"


def policy(name, spec, namespace="default"):
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def to_echo(principal=SHELL, port=8080, source_ip="10.244.1.5", labels=None):
    return Connection(
        "default", labels if labels is not None else {"app": "echo"}, port, source_ip, "10.244.2.7", principal
    )


ALLOW_SHELL = policy(
    "allow-shell",
    {
        "selector": {"matchLabels": {"app": "echo"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": [SHELL]}}]}],
    },
)


def test_without_policies_everything_is_allowed():
    assert Authorizer().check(to_echo(OTHER)).allowed


@pytest.mark.parametrize(
    ("principal", "labels", "allowed"),
    [
        (SHELL, {"app": "echo"}, True),
        (OTHER, {"app": "echo"}, False),
        (None, {"app": "echo"}, False),  # plaintext: no principal to match
        (OTHER, {"app": "web"}, True),  # the selector does not pick this workload: no ALLOW applies
    ],
)
def test_allow_by_principal_with_a_selector(principal, labels, allowed):
    auth = Authorizer()
    assert auth.upsert(ALLOW_SHELL)
    decision = auth.check(to_echo(principal, labels=labels))
    assert decision.allowed is allowed
    if principal == SHELL:
        assert decision.policy == "default/allow-shell"


@pytest.mark.parametrize(
    ("source", "principal", "allowed"),
    [
        ({"namespaces": ["default"]}, SHELL, True),
        ({"namespaces": ["default"]}, OTHER, False),
        ({"notNamespaces": ["other"]}, OTHER, False),
        ({"principals": ["cluster.local/ns/default/*"]}, SHELL, True),
        ({"principals": ["*/sa/test"]}, OTHER, True),
        ({"principals": ["*"]}, None, False),  # "*" means any authenticated source
        ({"ipBlocks": ["10.244.1.0/24"]}, None, True),
        ({"notIpBlocks": ["10.244.1.0/24"]}, None, False),
        ({"namespaces": ["default"], "ipBlocks": ["10.99.0.0/16"]}, SHELL, False),  # fields AND
    ],
)
def test_source_fields(source, principal, allowed):
    auth = Authorizer()
    auth.upsert(policy("p", {"rules": [{"from": [{"source": source}]}]}))
    assert auth.check(to_echo(principal)).allowed is allowed


@pytest.mark.parametrize(
    ("operation", "port", "allowed"),
    [({"ports": ["8080"]}, 8080, True), ({"ports": ["8080"]}, 9090, False), ({"notPorts": ["9090"]}, 9090, False)],
)
def test_allow_to_ports(operation, port, allowed):
    auth = Authorizer()
    auth.upsert(policy("p", {"rules": [{"to": [{"operation": operation}]}]}))
    assert auth.check(to_echo(port=port)).allowed is allowed


def test_deny_wins_over_allow_and_applies_from_the_root_namespace():
    auth = Authorizer()
    auth.upsert(ALLOW_SHELL)
    auth.upsert(
        policy(
            "no-9090",
            {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]},
            namespace="istio-system",
        )
    )
    assert auth.check(to_echo(SHELL, port=8080)).allowed
    denied = auth.check(to_echo(SHELL, port=9090))
    assert not denied.allowed and denied.policy == "istio-system/no-9090"
    # a DENY in another namespace does not apply here
    auth.upsert(policy("deny-all", {"action": "DENY", "rules": [{}]}, namespace="other"))
    assert auth.check(to_echo(SHELL)).allowed


def test_allow_nothing_and_deny_nothing():
    auth = Authorizer()
    auth.upsert(policy("allow-nothing", {"action": "ALLOW"}))  # no rules: matches nothing, so denies all
    assert not auth.check(to_echo(SHELL)).allowed
    auth = Authorizer()
    auth.upsert(policy("deny-nothing", {"action": "DENY"}))
    assert auth.check(to_echo(SHELL)).allowed
    auth.upsert(policy("allow-all", {"rules": [{}]}))  # one empty rule matches everything
    assert auth.check(to_echo(OTHER)).allowed


def test_when_conditions():
    auth = Authorizer()
    auth.upsert(
        policy(
            "p",
            {
                "rules": [
                    {
                        "when": [
                            {"key": "source.namespace", "values": ["default"]},
                            {"key": "source.ip", "notValues": ["10.244.1.99"]},
                        ]
                    }
                ]
            },
        )
    )
    assert auth.check(to_echo(SHELL)).allowed
    assert not auth.check(to_echo(SHELL, source_ip="10.244.1.99")).allowed
    assert not auth.check(to_echo(OTHER)).allowed


def test_l7_rules_fail_closed_at_l4():
    auth = Authorizer()
    get_only = {"from": [{"source": {"principals": [SHELL]}}], "to": [{"operation": {"methods": ["GET"]}}]}
    auth.upsert(policy("allow-get", {"rules": [get_only]}))
    assert not auth.check(to_echo(SHELL)).allowed  # ALLOW needing a method: never matches at L4
    auth = Authorizer()
    auth.upsert(policy("deny-get", {"action": "DENY", "rules": [get_only]}))
    assert not auth.check(to_echo(SHELL)).allowed  # DENY: its L4 part (the principal) decides
    assert auth.check(to_echo(OTHER)).allowed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"action": "PERMIT"}, "spec.action"),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks[0]",
        ),
        ({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, "spec.rules[0].to[0].operation.ports[0]"),
        ({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}, "spec.rules[0].from[0].source.principal"),
        ({"rules": "all"}, "spec.rules"),
        ({"selector": {"matchLabels": {"app": 3}}}, "spec.selector.matchLabels"),
    ],
)
def test_malformed_policies_are_rejected_naming_the_field(spec, message):
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(policy("bad", spec))


def test_a_rejected_update_fails_closed_and_names_the_field():
    """As Istio: a DENY that cannot be read denies everything it selects (it no longer keeps its last good
    version, which let through what the new one meant to deny)."""
    auth = Authorizer()
    auth.upsert(ALLOW_SHELL)
    auth.upsert(policy("deny-9090", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}))
    broken = policy("deny-9090", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["nine"]}}]}]})
    assert not auth.upsert(broken)
    assert "ports[0]" in auth.rejected["default/deny-9090"]
    assert not auth.check(to_echo(SHELL, port=9090)).allowed
    assert not auth.check(to_echo(SHELL, port=8080)).allowed
