import pytest

from noded.model.objects import ManifestError, parse_endpoint_slice, parse_service
from noded.model.tracker import Frontend, ServiceModel
from tests.objects import endpoint, service, slice_


def test_named_and_numbered_ports_tcp_udp():
    ports = parse_service(
        service(
            "dns",
            "10.96.0.10",
            [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        )
    )
    assert [(p.name.port, p.name.protocol, p.port) for p in ports] == [("dns", "UDP", 53), ("dns-tcp", "TCP", 53)]
    single = parse_service(service("web", "10.96.0.11", [{"port": 80}]))
    assert single[0].name.port == "" and single[0].name.protocol == "TCP"


def test_headless_and_externalname_have_no_frontends():
    assert parse_service(service("h", "None")) == []
    assert (
        parse_service(
            {
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"type": "ExternalName", "externalName": "example.com"},
            }
        )
        == []
    )


def test_session_affinity_timeout():
    sp = parse_service(service("a", sessionAffinity="ClientIP"))[0]
    assert sp.affinity_timeout == 10800
    sp = parse_service(
        service("a", sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})
    )[0]
    assert sp.affinity_timeout == 30


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["spec"].update(clusterIP="10.96.0.300", clusterIPs=["10.96.0.300"]), r"clusterIPs\[0\]"),
        (lambda s: s["spec"]["ports"][0].update(port=70000), r"ports\[0\].port"),
        (lambda s: s["spec"]["ports"][0].update(protocol="ICMP"), r"ports\[0\].protocol"),
        (lambda s: s["spec"].update(sessionAffinity="Cookie"), "sessionAffinity"),
        (lambda s: s["spec"].update(ports="80"), "spec.ports"),
        (lambda s: s["metadata"].pop("name"), "metadata.name"),
        (
            lambda s: s["spec"].update(
                sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}
            ),
            "timeoutSeconds",
        ),
    ],
)
def test_malformed_service_names_the_field(mutate, message):
    svc = service("bad")
    mutate(svc)
    with pytest.raises(ManifestError, match=message):
        parse_service(svc)


def test_endpoint_conditions_default_like_kubernetes():
    s = parse_endpoint_slice(slice_("web", [{"addresses": ["10.244.1.2"]}, endpoint("10.244.1.3", ready=False)]))
    a, b = s.endpoints
    assert (a.ready, a.serving, a.terminating) == (True, True, False)
    assert (b.ready, b.serving, b.terminating) == (False, False, False)


def test_slice_without_service_label_is_ignored_and_bad_address_rejected():
    orphan = slice_("web", [endpoint("10.244.1.2")])
    del orphan["metadata"]["labels"]
    assert parse_endpoint_slice(orphan) is None
    with pytest.raises(ManifestError, match=r"endpoints\[0\].addresses\[0\]"):
        parse_endpoint_slice(slice_("web", [endpoint("fd00::1")]))


def test_frontends_ready_and_terminating_fallback():
    m = ServiceModel()
    m.upsert(service("web"))
    m.upsert(
        slice_(
            "web",
            [
                endpoint("10.244.1.2"),
                endpoint("10.244.1.3", ready=False, serving=True, terminating=True),
                endpoint("10.244.1.4", ready=False, serving=False),
            ],
        )
    )
    st = m.frontends_of(("default", "web"))[Frontend("10.96.0.10", 80, "TCP")]
    assert st.ready == (("10.244.1.2", 8080),)
    assert st.terminating == (("10.244.1.3", 8080),)


def test_dual_stack_frontends_get_their_family():
    m = ServiceModel()
    m.upsert(service("web", ["10.96.0.10", "fd00:96::10"]))
    m.upsert(slice_("web", [endpoint("10.244.1.2")], name="web-v4"))
    m.upsert(slice_("web", [endpoint("fd00:244::2")], name="web-v6", address_type="IPv6"))
    fes = m.frontends_of(("default", "web"))
    assert fes[Frontend("10.96.0.10", 80, "TCP")].ready == (("10.244.1.2", 8080),)
    assert fes[Frontend("fd00:96::10", 80, "TCP")].ready == (("fd00:244::2", 8080),)


def test_port_matching_by_name_and_protocol():
    m = ServiceModel()
    m.upsert(
        service(
            "dns",
            "10.96.0.10",
            [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "metrics", "port": 9153, "protocol": "TCP"}],
        )
    )
    m.upsert(
        slice_(
            "dns",
            [endpoint("10.244.1.5")],
            ports=[
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "metrics", "port": 9153, "protocol": "TCP"},
            ],
        )
    )
    fes = m.frontends_of(("default", "dns"))
    assert fes[Frontend("10.96.0.10", 53, "UDP")].ready == (("10.244.1.5", 5353),)
    assert fes[Frontend("10.96.0.10", 9153, "TCP")].ready == (("10.244.1.5", 9153),)


def test_change_tracking_marks_only_touched_services():
    m = ServiceModel()
    m.upsert(service("a", "10.96.0.1"))
    m.upsert(service("b", "10.96.0.2"))
    assert m.take_changes() == {("default", "a"), ("default", "b")}
    m.upsert(service("a", "10.96.0.1"))  # unchanged
    assert m.take_changes() == set()
    m.upsert(slice_("b", [endpoint("10.244.1.9")]))
    assert m.take_changes() == {("default", "b")}
    m.delete("EndpointSlice", "default", "b-abc")
    assert m.take_changes() == {("default", "b")}


def test_malformed_object_rejected_alone_keeping_last_good_version():
    m = ServiceModel()
    assert m.upsert(service("a", "10.96.0.1"))
    m.take_changes()
    broken = service("a", "10.96.0.1")
    broken["spec"]["ports"][0]["port"] = "eighty"
    assert not m.upsert(broken)
    assert m.rejected == 1 and m.take_changes() == set()
    assert Frontend("10.96.0.1", 80, "TCP") in m.frontends_of(("default", "a"))
