"""The in-pod capture ruleset: which DNS it takes to noded, and what it leaves to the pod."""

import pytest

from noded.config import ConfigError, parse
from noded.redirect.rules import DNS_PORT, capture_script


def dns_rules(script: str) -> list[str]:
    return [line for line in script.splitlines() if "dport 53" in line]


def test_only_the_cluster_dns_addresses_are_redirected():
    script = capture_script(False, cluster_dns=("10.96.0.10", "fd96::a"))
    assert dns_rules(script) == [
        f"add rule inet noded-capture output-nat ip daddr {{ 10.96.0.10 }} meta l4proto {{ tcp, udp }} th dport 53"
        f" redirect to :{DNS_PORT}",
        f"add rule inet noded-capture output-nat ip6 daddr {{ fd96::a }} meta l4proto {{ tcp, udp }} th dport 53"
        f" redirect to :{DNS_PORT}",
    ]


def test_no_cluster_dns_address_known_means_no_dns_interception():
    assert dns_rules(capture_script(True)) == []


def test_a_node_local_address_that_is_also_the_cluster_dns_is_left_to_the_fast_path():
    script = capture_script(False, direct_dns=("169.254.20.10",), cluster_dns=("169.254.20.10", "10.96.0.10"))
    assert [r for r in dns_rules(script) if "169.254.20.10" in r and "redirect" in r] == []
    assert any("10.96.0.10" in r for r in dns_rules(script))


def test_dns_to_the_addresses_the_node_answers_is_not_tracked_in_the_pod():
    """NodeLocal DNSCache's NOTRACK, in the pod: no conntrack entry per query, no insertion race between the
    A and AAAA queries glibc sends at once from one socket."""
    script = capture_script(True, direct_dns=("10.96.0.10", "fd96::a"), cluster_dns=("10.96.0.10",))
    assert [line for line in script.splitlines() if "notrack" in line] == [
        "add rule inet noded-capture raw-out ip daddr { 10.96.0.10 } udp dport 53 notrack",
        "add rule inet noded-capture raw-out ip6 daddr { fd96::a } udp dport 53 notrack",
        "add rule inet noded-capture raw-in ip saddr { 10.96.0.10 } udp sport 53 notrack",
        "add rule inet noded-capture raw-in ip6 saddr { fd96::a } udp sport 53 notrack",
    ]
    assert "raw-out { type filter hook output priority raw ;" in script


def test_only_addresses_reach_the_rule_text():
    script = capture_script(False, cluster_dns=("10.96.0.10 } accept ; flush ruleset ; {", "10.96.0.10"))
    assert "flush ruleset" not in script and len(dns_rules(script)) == 1


def test_cluster_dns_setting_is_validated():
    assert parse({"dns": {"clusterDNS": ["10.43.0.10"]}}).dns.clusterDNS == ["10.43.0.10"]
    with pytest.raises(ConfigError, match=r"dns.clusterDNS\[0\]"):
        parse({"dns": {"clusterDNS": ["kube-dns"]}})
