import dataclasses
import re

from noded.model.objects import parse_service
from noded.model.tracker import Frontend, FrontendState, ServiceModel
from noded.services import nftrules
from tests.objects import endpoint, service, slice_

NAME_OK = re.compile(r"^[A-Za-z][A-Za-z0-9/_.\-]*$")  # what nft 1.0 takes unquoted


def state(ready=(), terminating=(), **spec):
    svc = {
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}], **spec},
    }
    return FrontendState(parse_service(svc)[0], tuple(ready), tuple(terminating))


def test_no_endpoints_goes_to_the_reject_map():
    r = nftrules.frontend_rules(Frontend("10.96.0.10", 80, "TCP"), state(), ["10.244.0.0/16"])
    assert r.element_map == "no-endpoint-services"
    assert r.element == "10.96.0.10 . tcp . 80 : goto reject-chain"
    assert r.chains == {}


def test_random_choice_draws_from_the_shared_endpoint_map_and_hairpin_goes_to_the_set():
    backends = [("10.244.1.2", 8080), ("10.244.2.2", 8080), ("10.244.3.2", 8080)]
    r = nftrules.frontend_rules(Frontend("10.96.0.10", 80, "TCP"), state(backends), ["10.244.0.0/16"])
    assert r.element_map == "service-ips"
    assert r.chains == {}  # no chain of its own: its element goes to the pick chain it shares
    assert r.element == "10.96.0.10 . tcp . 80 : goto pick-tcp-3-offcluster"
    # every TCP frontend with three endpoints masqueraded from outside the cluster shares this one
    masquerade = "ip saddr != { 10.244.0.0/16 } jump mark-for-masquerade"
    dnat = "meta l4proto tcp dnat ip to ip daddr . tcp dport . numgen random mod 3 map @endpoints-tcp"
    assert r.picks == {("pick-tcp-3-offcluster", (masquerade, dnat))}
    assert all(NAME_OK.match(name) for name, _ in r.picks)
    assert r.endpoint_map == "endpoints-tcp"
    assert r.endpoints == (
        "10.96.0.10 . 80 . 0 : 10.244.1.2 . 8080",
        "10.96.0.10 . 80 . 1 : 10.244.2.2 . 8080",
        "10.96.0.10 . 80 . 2 : 10.244.3.2 . 8080",
    )
    assert r.hairpin == ("10.244.1.2", "10.244.2.2", "10.244.3.2")
    assert nftrules.hairpin_element("10.244.1.2") == ("hairpin", "10.244.1.2 . 10.244.1.2")
    # an endpoint replaced changes elements only; a count change changes the rule
    swapped = nftrules.frontend_rules(
        Frontend("10.96.0.10", 80, "TCP"), state([backends[0], ("10.244.9.9", 8080), backends[2]]), ["10.244.0.0/16"]
    )
    assert (swapped.element, swapped.picks) == (r.element, r.picks)
    assert swapped.endpoints[1] == "10.96.0.10 . 80 . 1 : 10.244.9.9 . 8080"
    many = [(f"10.244.1.{i}", 8080) for i in range(1, 101)]
    r = nftrules.frontend_rules(Frontend("10.96.0.10", 53, "UDP"), state(many), [])
    assert r.element == "10.96.0.10 . udp . 53 : goto pick-udp-100"  # no cluster CIDR: no masquerading
    ((_pick, (rule,)),) = r.picks
    assert rule.endswith("numgen random mod 100 map @endpoints-udp")
    assert len(r.endpoints) == 100 and r.endpoint_map == "endpoints-udp"


def test_terminating_fallback_is_marked_and_used_only_without_ready():
    r = nftrules.frontend_rules(Frontend("10.96.0.10", 80, "TCP"), state([], [("10.244.1.9", 8080)]), [])
    assert r.element.endswith("goto pick-tcp-1-terminating")
    ((_name, (dnat,)),) = r.picks
    assert dnat.endswith('map @endpoints-tcp comment "serving-terminating"')
    assert r.endpoints == ("10.96.0.10 . 80 . 0 : 10.244.1.9 . 8080",)
    r = nftrules.frontend_rules(
        Frontend("10.96.0.10", 80, "TCP"), state([("10.244.1.2", 8080)], [("10.244.1.9", 8080)]), []
    )
    assert not any("10.244.1.9" in e for e in r.endpoints)


def test_affinity_sets_and_ipv6():
    st = state(
        [("fd00:244::2", 8080)], sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}
    )
    r = nftrules.frontend_rules(Frontend("fd00:96::10", 80, "UDP"), st, ["10.244.0.0/16", "fd00:244::/64"])
    assert r.element_map == "service-ips6"
    assert r.element.startswith("fd00:96::10 . udp . 80 : goto service-")
    ((aff, spec),) = r.sets.items()
    assert "type ipv6_addr" in spec and "timeout 60s" in spec
    (ep,) = (rules for name, rules in r.chains.items() if name.startswith("endpoint-"))
    assert ep == (f"update @{aff} {{ ip6 saddr }}", "meta l4proto udp dnat ip6 to [fd00:244::2]:8080")
    assert all(NAME_OK.match(n) for n in r.chains)
    assert nftrules.hairpin_element("fd00:244::2") == ("hairpin6", "fd00:244::2 . fd00:244::2")


def test_local_policy_short_circuits_pods_and_drops_the_rest_in_both_renderers():
    from dataclasses import replace

    from noded.services import iptrules

    fe = Frontend("192.0.2.11", 30080, "TCP")
    st = replace(
        state(type="NodePort", externalTrafficPolicy="Local"),
        kind="NodePort",
        local_external=True,
        in_cluster=((("10.244.2.2", 8080),), ()),
    )
    nft = nftrules.frontend_rules(fe, st, ["10.244.0.0/16"])
    svc = next(rules for name, rules in nft.chains.items() if name.startswith("service-") and "cluster" not in name)
    assert svc[0] == "ip saddr { 10.244.0.0/16 } jump mark-for-masquerade"  # pods addressed this node
    assert svc[1].startswith("ip saddr { 10.244.0.0/16 } goto service-")
    assert svc[-1] == 'drop comment "no local endpoints"'
    # the short-circuit's pick draws from slots of its own in the same map
    cluster = next(rules for name, rules in nft.chains.items() if name.endswith("/cluster"))
    offset = nftrules.CLUSTER_SLOTS
    assert cluster == ("goto pick-tcp-1-cluster",)
    rule = f"meta l4proto tcp dnat ip to ip daddr . tcp dport . numgen random mod 1 offset {offset} map @endpoints-tcp"
    assert ("pick-tcp-1-cluster", (rule,)) in nft.picks
    assert nft.endpoints == (f"192.0.2.11 . 30080 . {offset} : 10.244.2.2 . 8080",)
    ipt = iptrules.frontend_rules(fe, st, ["10.244.0.0/16"])
    assert ipt.filter_rule.endswith("-j DROP") and "--dport 30080" in ipt.filter_rule
    fe_chain = next(rules for name, rules in ipt.chains.items() if name.startswith("NODED-FE-"))
    assert fe_chain[:2] == (
        "-s 10.244.0.0/16 -j NODED-MARK-MASQ",
        next(r for r in fe_chain if r.startswith("-s ") and "-SC-" in r),
    )
    assert all(len(name) <= 28 for name in ipt.chains)


def test_iptables_masquerades_sources_outside_every_cluster_cidr():
    from noded.services import iptrules

    st = state([("10.244.1.2", 8080)])
    fe = Frontend("10.96.0.10", 80, "TCP")
    one = iptrules.frontend_rules(fe, st, ["10.244.0.0/16"])
    rules = next(r for name, r in one.chains.items() if name.startswith("NODED-FE-"))
    assert rules[0] == "! -s 10.244.0.0/16 -j NODED-MARK-MASQ"
    two = iptrules.frontend_rules(fe, st, ["10.244.0.0/16", "10.245.0.0/16"])
    rules = next(r for name, r in two.chains.items() if name.startswith("NODED-FE-"))
    assert rules[:3] == (
        "-j NODED-MARK-MASQ",
        "-s 10.244.0.0/16 -j MARK --and-mark 0xffffbfff",
        "-s 10.245.0.0/16 -j MARK --and-mark 0xffffbfff",
    )


def test_names_that_could_carry_rule_text_are_rejected_by_the_model_and_never_reach_rules():
    """Issue 17, item 9: a port name with a newline produced a standalone `flush ruleset`, a quote injected
    `-j ACCEPT`. The model refuses what the API server refuses; the renderers keep rule text safe anyway."""
    import pytest

    from noded.model.objects import ManifestError
    from noded.services import iptrules

    for field, value in (
        ("port name", "http\nflush ruleset"),
        ("port name", 'x" -j ACCEPT "'),
        ("name", "web\nflush"),
        ("namespace", "Default"),
    ):
        svc = {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
        }
        if field == "port name":
            svc["spec"]["ports"][0]["name"] = value
        else:
            svc["metadata"][field] = value
        with pytest.raises(ManifestError):
            parse_service(svc)
    # a state built around the parser (as a bug would) still renders one safe word per name
    st = state([("10.244.1.2", 8080)], externalTrafficPolicy="Local", type="NodePort")
    hostile = st.service.name.__class__("default", "web", 'p\nflush ruleset ; "', "TCP")
    st = FrontendState(dataclasses.replace(st.service, name=hostile), st.ready, st.terminating)
    nft = nftrules.frontend_rules(Frontend("10.96.0.10", 80, "TCP"), st, ["10.244.0.0/16"])
    for name in nft.chains:
        assert NAME_OK.match(name), name
    ipt = iptrules.frontend_rules(Frontend("10.96.0.10", 80, "TCP"), st, ["10.244.0.0/16"])
    lines = [ipt.nat_service_rule or "", ipt.filter_rule or "", *(r for rules in ipt.chains.values() for r in rules)]
    for line in lines:
        assert "\n" not in line and "flush ruleset" not in line and line.count('"') % 2 == 0, line
    assert any("p_flush_ruleset" in line for line in lines)  # the name is there, made harmless


def test_hairpin_holds_only_endpoints_that_may_be_this_nodes_pods():
    """A connection is DNATed back to its own source only on its own node: the hairpin set holds this node's
    endpoints and those naming no node, not the cluster's (in real slices every pod endpoint names its node)."""
    model = ServiceModel(node_name="n1")
    model.upsert(service("web", "10.96.0.10"))
    eps = [endpoint("10.244.1.2", node="n1"), endpoint("10.244.2.2", node="n2"), endpoint("10.244.3.2")]
    model.upsert(slice_("web", eps))
    ((fe, st),) = model.frontends_of(("default", "web")).items()
    r = nftrules.frontend_rules(fe, st, ["10.244.0.0/16"])
    assert len(r.endpoints) == 3  # every endpoint is still reached
    assert r.hairpin == ("10.244.1.2", "10.244.3.2")
    # a model that does not know its node's name cannot tell: every endpoint
    anywhere = ServiceModel()
    anywhere.upsert(service("web", "10.96.0.10"))
    anywhere.upsert(slice_("web", eps))
    ((fe, st),) = anywhere.frontends_of(("default", "web")).items()
    assert nftrules.frontend_rules(fe, st, ["10.244.0.0/16"]).hairpin == ("10.244.1.2", "10.244.2.2", "10.244.3.2")
