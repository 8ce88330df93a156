"""The cluster zone, query by query from the Kubernetes DNS specification (schema 1.1.0) and CoreDNS."""

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from noded.dns.zone import ClusterZone
from tests.dnsfixtures import Z, cluster_model
from tests.objects import endpoint, service, slice_


@pytest.fixture
def zone():
    return ClusterZone(cluster_model(), Z, ttl=5)


def ask(zone, name, rdtype="A"):
    q = dns.message.make_query(name, rdtype)
    return zone.answer(q)


def records(ans, section="answer"):
    return sorted(
        (rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype), r.to_text())
        for rr in getattr(ans.reply, section)
        for r in rr
    )


def test_cluster_ip_service_a_and_aaaa_with_the_default_ttl(zone):
    ans = ask(zone, f"web.default.svc.{Z}")
    assert records(ans) == [(f"web.default.svc.{Z}.", "A", "10.96.0.10")]
    assert ans.reply.answer[0].ttl == 5 and ans.reply.flags & dns.flags.AA
    assert records(ask(zone, f"web.default.svc.{Z}", "AAAA")) == [(f"web.default.svc.{Z}.", "AAAA", "fd96::10")]


def test_names_match_case_insensitively_and_keep_the_question_case(zone):
    ans = ask(zone, "WeB.Default.SVC.cluster.LOCAL")
    assert [r[2] for r in records(ans)] == ["10.96.0.10"]
    assert ans.reply.answer[0].name.to_text() == "WeB.Default.SVC.cluster.LOCAL."


def test_missing_names_are_nxdomain_and_empty_types_nodata_both_with_the_soa(zone):
    ans = ask(zone, f"nope.default.svc.{Z}")
    assert ans.reply.rcode() == dns.rcode.NXDOMAIN and records(ans, "authority")[0][1] == "SOA"
    ans = ask(zone, f"web.default.svc.{Z}", "MX")
    assert ans.reply.rcode() == dns.rcode.NOERROR and not ans.reply.answer
    assert records(ans, "authority")[0][1] == "SOA"
    # a namespace with services and svc.<zone> are empty non-terminals: NODATA, not NXDOMAIN
    assert ask(zone, f"default.svc.{Z}").reply.rcode() == dns.rcode.NOERROR
    assert ask(zone, f"svc.{Z}").reply.rcode() == dns.rcode.NOERROR
    assert ask(zone, f"nosuchns.svc.{Z}").reply.rcode() == dns.rcode.NXDOMAIN


def test_srv_for_named_ports_with_the_address_in_additional(zone):
    ans = ask(zone, f"_http._tcp.web.default.svc.{Z}", "SRV")
    assert records(ans) == [(f"_http._tcp.web.default.svc.{Z}.", "SRV", f"0 100 80 web.default.svc.{Z}.")]
    assert {r[2] for r in records(ans, "additional")} == {"10.96.0.10", "fd96::10"}
    assert records(ask(zone, f"_dns._udp.web.default.svc.{Z}", "SRV"))[0][2].split()[2] == "53"
    assert ask(zone, f"_http._udp.web.default.svc.{Z}", "SRV").reply.rcode() == dns.rcode.NXDOMAIN


def test_headless_service_answers_its_ready_endpoints(zone):
    assert [r[2] for r in records(ask(zone, f"db.default.svc.{Z}"))] == ["10.244.1.5", "10.244.2.7"]
    # per endpoint: its hostname, else its address dashed (CoreDNS)
    assert [r[2] for r in records(ask(zone, f"db-0.db.default.svc.{Z}"))] == ["10.244.1.5"]
    assert [r[2] for r in records(ask(zone, f"10-244-2-7.db.default.svc.{Z}"))] == ["10.244.2.7"]
    assert ask(zone, f"10-244-3-9.db.default.svc.{Z}").reply.rcode() == dns.rcode.NXDOMAIN  # not ready
    # SRV: one per endpoint, to its own name, with the endpoint's port
    srv = records(ask(zone, f"_pg._tcp.db.default.svc.{Z}", "SRV"))
    assert [r[2].split()[2:] for r in srv] == [
        ["15432", f"10-244-2-7.db.default.svc.{Z}."],
        ["15432", f"db-0.db.default.svc.{Z}."],
    ]


def test_headless_service_without_ready_endpoints_is_nxdomain():
    """The DNS spec (2.4.1) and CoreDNS: a headless service with no ready endpoint has no A/AAAA records and
    the name does not exist; one family only is NODATA for the other."""
    m = cluster_model()
    m.upsert(service("idle", "None"))
    m.upsert(slice_("idle", [endpoint("10.244.1.9", ready=False)], name="idle-x"))
    m.upsert(service("bare", "None"))  # no slice at all
    zone = ClusterZone(m, Z, ttl=5)
    for name in (f"idle.default.svc.{Z}", f"bare.default.svc.{Z}"):
        for rdtype in ("A", "AAAA"):
            ans = ask(zone, name, rdtype)
            assert ans.reply.rcode() == dns.rcode.NXDOMAIN, (name, rdtype)
            assert records(ans, "authority")[0][1] == "SOA"
    held = {record for records in zone.address_records().values() for record in records}
    assert (f"idle.default.svc.{Z}".lower() + ".", 1) not in held  # the fast path defers
    ans = ask(zone, f"db.default.svc.{Z}", "AAAA")  # IPv4 endpoints only: the name exists
    assert ans.reply.rcode() == dns.rcode.NOERROR and not ans.reply.answer


def test_publish_not_ready_addresses(zone):
    assert [r[2] for r in records(ask(zone, f"pub.default.svc.{Z}"))] == ["10.244.1.8"]


def test_external_name_is_a_cname_chased_inside_the_zone(zone):
    ans = ask(zone, f"ext.default.svc.{Z}")
    assert records(ans) == [(f"ext.default.svc.{Z}.", "CNAME", "example.org.")]
    assert ans.chase.to_text() == "example.org."  # for the resolver to resolve upstream and append
    ans = ask(zone, f"alias.default.svc.{Z}")
    assert records(ans) == [
        (f"alias.default.svc.{Z}.", "CNAME", f"web.default.svc.{Z}."),
        (f"web.default.svc.{Z}.", "A", "10.96.0.10"),
    ]
    assert ans.chase is None


def test_ptr_for_cluster_ips_and_headless_endpoints_others_forwarded(zone):
    assert records(ask(zone, "10.0.96.10.in-addr.arpa", "PTR"))[0][2] == f"web.default.svc.{Z}."
    ans = ask(zone, dns.reversename.from_address("fd96::10").to_text(), "PTR")
    assert records(ans)[0][2] == f"web.default.svc.{Z}."
    assert records(ask(zone, "5.1.244.10.in-addr.arpa", "PTR"))[0][2] == f"db-0.db.default.svc.{Z}."
    assert ask(zone, "8.8.8.8.in-addr.arpa", "PTR") is None


def test_dns_version_and_pod_names_and_soa(zone):
    assert records(ask(zone, f"dns-version.{Z}", "TXT")) == [(f"dns-version.{Z}.", "TXT", '"1.1.0"')]
    assert records(ask(zone, f"10-244-1-5.default.pod.{Z}")) == [(f"10-244-1-5.default.pod.{Z}.", "A", "10.244.1.5")]
    assert records(ask(zone, f"{Z}", "SOA"))[0][1] == "SOA"


def test_names_outside_the_zone_are_forwarded(zone):
    assert ask(zone, "example.org") is None


def test_answers_follow_the_model_at_once(zone):
    zone.model.upsert(service("new", "10.96.0.77"))
    assert [r[2] for r in records(ask(zone, f"new.default.svc.{Z}"))] == ["10.96.0.77"]
    zone.model.delete("Service", "default", "new")
    assert ask(zone, f"new.default.svc.{Z}").reply.rcode() == dns.rcode.NXDOMAIN


def _change_strategy():
    from hypothesis import strategies as st

    names = st.sampled_from(["a", "b", "c", "d"])
    namespaces = st.sampled_from(["default", "other"])
    ip = st.builds(lambda i: f"10.98.0.{i}", st.integers(1, 6))  # few addresses: shared owners happen
    pod = st.builds(lambda i: f"10.244.7.{i}", st.integers(1, 6))
    upsert_service = st.tuples(
        st.just("service"), namespaces, names, st.sampled_from(["ClusterIP", "headless", "ExternalName"]), ip
    )
    upsert_slice = st.tuples(
        st.just("slice"), namespaces, names, st.lists(st.tuples(pod, st.booleans(), st.booleans()), max_size=4)
    )
    delete = st.tuples(st.sampled_from(["delete-service", "delete-slice"]), namespaces, names)
    return st.lists(st.one_of(upsert_service, upsert_slice, delete), max_size=40)


def _apply(model, change) -> None:
    kind, namespace, name = change[:3]
    if kind == "service":
        spec_kind, ip = change[3], change[4]
        obj = service(name, "None" if spec_kind == "headless" else ip, namespace=namespace)
        if spec_kind == "ExternalName":
            obj["spec"] = {"type": "ExternalName", "externalName": "example.org"}
        model.upsert(obj)
    elif kind == "slice":
        eps = []
        for address, ready, named in change[3]:
            eps.append(endpoint(address, ready=ready))
            if named:
                eps[-1]["hostname"] = f"h{address.rsplit('.', 1)[1]}"
        model.upsert(slice_(name, eps, name=f"{name}-x", namespace=namespace))
    elif kind == "delete-service":
        model.delete("Service", namespace, name)
    else:
        model.delete("EndpointSlice", namespace, f"{name}-x")


def _everything(zone: ClusterZone) -> list:
    """Every answer the zone gives for the names and addresses the changes can make."""
    out = []
    questions = [(f"{ns}.svc.{Z}", "A") for ns in ("default", "other", "none")]
    for ns in ("default", "other"):
        for name in "abcd":
            base = f"{name}.{ns}.svc.{Z}"
            questions += [(base, "A"), (base, "CNAME"), (f"_http._tcp.{base}", "SRV")]
            questions += [(f"h{i}.{base}", "A") for i in range(1, 7)]
            questions += [(f"10-244-7-{i}.{base}", "A") for i in range(1, 7)]
    questions += [(dns.reversename.from_address(f"10.98.0.{i}").to_text(), "PTR") for i in range(1, 7)]
    questions += [(dns.reversename.from_address(f"10.244.7.{i}").to_text(), "PTR") for i in range(1, 7)]
    for name, rdtype in questions:
        q = dns.message.make_query(name, rdtype)
        q.id = 7
        answer = zone.answer(q)
        out.append((name, rdtype, None if answer is None else answer.reply.to_wire(want_shuffle=False)))
    return out


def test_property_the_zone_kept_in_step_answers_as_one_built_afresh():
    """Issue 20, item 5: the zone follows the model service by service (its own change tracker); after any
    sequence of Service and EndpointSlice changes, asked between changes, it answers every question exactly as
    a zone built from the model at that point does."""
    from hypothesis import given, settings

    from noded.model.tracker import ServiceModel

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(_change_strategy(), _change_strategy())
    def check(first, second):
        model = ServiceModel()
        kept = ClusterZone(model, Z, ttl=5)
        for change in first:
            _apply(model, change)
        _everything(kept)  # asked halfway: the next answers come from updates, not a first build
        for change in second:
            _apply(model, change)
            if change[0] == "service":
                kept._current()  # sometimes in between too
        assert _everything(kept) == _everything(ClusterZone(model, Z, ttl=5))

    check()
