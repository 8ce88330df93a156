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
    woken: list[int] = []
    changes = m.frontend_changes(wake=lambda: woken.append(1))
    m.upsert(service("a", "10.96.0.1"))
    m.upsert(service("b", "10.96.0.2"))
    assert changes.pending() == 2 and changes.since is not None and len(woken) == 1  # woken once per batch
    assert changes.take() == {("default", "a"), ("default", "b")} and changes.since is None
    m.upsert(service("a", "10.96.0.1"))  # unchanged
    assert changes.take() == set()
    m.upsert(slice_("b", [endpoint("10.244.1.9")]))
    assert changes.take() == {("default", "b")} and len(woken) == 2
    m.delete("EndpointSlice", "default", "b-abc")
    assert changes.take() == {("default", "b")}


def test_each_proxier_has_its_own_tracker_and_a_full_sync_takes_every_service():
    m = ServiceModel()
    first, second = m.frontend_changes(), m.frontend_changes()
    m.upsert(service("a", "10.96.0.1"))
    assert first.take() == {("default", "a")}
    m.upsert(service("b", "10.96.0.2"))
    assert second.take() == {("default", "a"), ("default", "b")}  # its own: untouched by the first's take
    assert first.take_all(m.service_keys) == {("default", "a"), ("default", "b")} and first.take() == set()
    # a periodic full sync with nothing pending: every service, but no change waited (no programming latency)
    assert first.take_all(m.service_keys) == {("default", "a"), ("default", "b")} and first.taken_since is None


def test_malformed_object_rejected_alone_keeping_last_good_version():
    m = ServiceModel()
    changes = m.frontend_changes()
    assert m.upsert(service("a", "10.96.0.1"))
    changes.take()
    broken = service("a", "10.96.0.1")
    broken["spec"]["ports"][0]["port"] = "eighty"
    assert not m.upsert(broken)
    assert m.rejected == 1 and changes.take() == set()
    assert Frontend("10.96.0.1", 80, "TCP") in m.frontends_of(("default", "a"))


# -- external entry points and traffic policies ------------------------------------------------
NODE_IP = "192.0.2.11"


def external_model(**spec):
    m = ServiceModel(node_name="node1", node_ips=(NODE_IP,))
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]
    m.upsert(service("web", ports=ports, **spec))
    m.upsert(
        slice_(
            "web",
            [
                endpoint("10.244.1.2", node="node1"),
                endpoint("10.244.2.2", node="node2"),
                endpoint("10.244.1.3", ready=False, serving=True, terminating=True, node="node1"),
            ],
        )
    )
    return m


def test_nodeport_lb_and_external_ips_are_frontends_of_their_kind():
    m = external_model(type="LoadBalancer", externalIPs=["198.51.100.7"], healthCheckNodePort=32000)
    m.upsert(
        {
            **service(
                "web",
                ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                type="LoadBalancer",
                externalIPs=["198.51.100.7"],
            ),
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}},
        }
    )
    fes = m.frontends_of(("default", "web"))
    kinds = {str(fe): st.kind for fe, st in fes.items()}
    assert kinds == {
        "10.96.0.10:80/TCP": "ClusterIP",
        "198.51.100.7:80/TCP": "ExternalIP",
        "203.0.113.9:80/TCP": "LoadBalancer",
        f"{NODE_IP}:30080/TCP": "NodePort",
    }
    both = (("10.244.1.2", 8080), ("10.244.2.2", 8080))
    assert all(st.ready == both and not st.local_external and st.in_cluster is None for st in fes.values())


def test_nodeports_follow_the_node_addresses():
    m = external_model(type="NodePort")
    changes = m.frontend_changes()
    assert m.set_node_ips(["192.0.2.12", NODE_IP]) and changes.take() == {("default", "web")}
    assert not m.set_node_ips([NODE_IP, "192.0.2.12"])
    nodeports = sorted(fe.ip for fe, st in m.frontends_of(("default", "web")).items() if st.kind == "NodePort")
    assert nodeports == [NODE_IP, "192.0.2.12"]


def test_external_traffic_policy_local_keeps_this_nodes_endpoints_for_external_traffic_only():
    fes = external_model(type="NodePort", externalTrafficPolicy="Local").frontends_of(("default", "web"))
    nodeport = fes[Frontend(NODE_IP, 30080, "TCP")]
    assert nodeport.local_external and nodeport.ready == (("10.244.1.2", 8080),)
    assert nodeport.terminating == (("10.244.1.3", 8080),)  # the fallback, used only while none is ready
    assert nodeport.in_cluster == ((("10.244.1.2", 8080), ("10.244.2.2", 8080)), (("10.244.1.3", 8080),))
    cluster = fes[Frontend("10.96.0.10", 80, "TCP")]
    assert len(cluster.ready) == 2 and not cluster.local_external


def test_internal_traffic_policy_local_and_local_terminating_fallback():
    m = external_model(internalTrafficPolicy="Local")
    assert m.frontends_of(("default", "web"))[Frontend("10.96.0.10", 80, "TCP")].ready == (("10.244.1.2", 8080),)
    m.upsert(
        slice_(
            "web",
            [
                endpoint("10.244.1.3", ready=False, serving=True, terminating=True, node="node1"),
                endpoint("10.244.2.2", node="node2"),
            ],
        )
    )
    st = m.frontends_of(("default", "web"))[Frontend("10.96.0.10", 80, "TCP")]
    assert st.ready == () and st.terminating == (("10.244.1.3", 8080),)


def test_zone_hints_used_only_when_complete_and_matching():
    m = ServiceModel(node_name="node1")
    m.upsert({"kind": "Node", "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "a"}}})
    m.upsert({"kind": "Node", "metadata": {"name": "node2", "labels": {"topology.kubernetes.io/zone": "b"}}})
    assert m.node_zone == "a"
    m.upsert(service("web", trafficDistribution="PreferClose"))
    fe = Frontend("10.96.0.10", 80, "TCP")

    def ready(*eps):
        m.upsert(slice_("web", list(eps)))
        return [ip for ip, _p in m.frontends_of(("default", "web"))[fe].ready]

    assert ready(endpoint("10.244.1.2", zone_hints=["a"]), endpoint("10.244.2.2", zone_hints=["b"])) == ["10.244.1.2"]
    # one ready endpoint without hints: hints are ignored (kube-proxy's rule)
    assert len(ready(endpoint("10.244.1.2", zone_hints=["a"]), endpoint("10.244.2.2"))) == 2
    # no endpoint for this zone: every endpoint
    assert len(ready(endpoint("10.244.1.2", zone_hints=["b"]), endpoint("10.244.2.2", zone_hints=["b"]))) == 2
    m.delete("Node", "", "node1")
    assert m.node_zone is None
    assert len(ready(endpoint("10.244.1.2", zone_hints=["a"]), endpoint("10.244.2.2", zone_hints=["b"]))) == 2


def test_health_checks_count_local_ready_endpoints():
    m = external_model(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000)
    assert m.health_checks() == {32000: ("default/web", 1)}
    # a dual-stack pod is one endpoint, though it has an address in each family's slice
    six = [endpoint("fd44::1:2", node="node1")]
    m.upsert(slice_("web", six, name="web-v6", address_type="IPv6"))
    assert m.health_checks() == {32000: ("default/web", 1)}
    m.delete("EndpointSlice", "default", "web-v6")
    m.upsert(slice_("web", [endpoint("10.244.2.2", node="node2")]))
    assert m.health_checks() == {32000: ("default/web", 0)}
    m.upsert(service("web", type="LoadBalancer", healthCheckNodePort=32000))  # Cluster policy: no health check
    assert m.health_checks() == {}


def test_nodeport_addresses_default_and_configured():
    from noded.kernel.addresses import nodeport_addresses

    addrs = ["127.0.0.1", "::1", "192.0.2.11", "10.244.1.1", "fe80::1", "2001:db8::11"]
    assert nodeport_addresses(addrs, [], ["10.244.0.0/16"]) == ["192.0.2.11", "2001:db8::11"]
    assert nodeport_addresses(addrs, ["192.0.2.0/24", "127.0.0.0/8"], []) == ["127.0.0.1", "192.0.2.11"]


def test_what_real_clusters_send_is_handled_as_kube_proxy_handles_it():
    """Issue 16, item 6: services another proxy owns (service-proxy-name) or marked headless are not
    proxied (their DNS stays); FQDN slices are ignored; several slices of one service merge."""
    m = ServiceModel()
    for label in ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"):
        svc = service("other-proxy", "10.96.0.70")
        svc["metadata"]["labels"] = {label: "x"}
        assert m.upsert(svc)
        assert m.upsert(slice_("other-proxy", [endpoint("10.244.1.7")]))
        assert m.frontends_of(("default", "other-proxy")) == {}
        assert ("default", "other-proxy") in m.dns_snapshot()[1]  # CoreDNS still answers for it
    m.upsert(service("web", "10.96.0.71"))
    m.upsert(slice_("web", [endpoint("10.244.1.2")], name="web-a"))
    m.upsert(slice_("web", [endpoint("10.244.2.2")], name="web-b"))
    fqdn = slice_("web", [endpoint("10.244.9.9")], name="web-fqdn", address_type="FQDN")
    fqdn["endpoints"][0]["addresses"] = ["db.example.com"]
    assert m.upsert(fqdn)
    fe = m.frontends_of(("default", "web"))[Frontend("10.96.0.71", 80, "TCP")]
    assert sorted(fe.ready) == [("10.244.1.2", 8080), ("10.244.2.2", 8080)]


def test_a_node_being_deleted_or_drained_by_the_autoscaler_is_not_eligible():
    """Issue 16, item 5 (KEP-3836): load balancers stop sending to such a node."""
    from noded.services.healthcheck import health_response

    m = ServiceModel(node_name="node1")
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}, "spec": {}}
    m.upsert(node)
    assert m.node_eligible
    m.upsert({**node, "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}})
    assert not m.node_eligible
    m.upsert(node)
    assert m.node_eligible
    m.upsert({**node, "metadata": {"name": "node1", "deletionTimestamp": "2026-12-06T10:00:00Z"}})
    assert not m.node_eligible
    m.upsert({**node, "metadata": {"name": "node2", "deletionTimestamp": "2026-12-06T10:00:00Z"}})  # another
    assert not m.node_eligible
    status, _headers, body = health_response("default/web", 3, healthy=False)
    assert status == 503 and b'"serviceProxyHealthy": false' in body
    assert health_response("default/web", 3)[0] == 200


def test_an_address_that_is_a_number_is_rejected_not_read_as_0_0_0_5():
    """ipaddress takes the integer 5 for 0.0.0.5; an endpoint or cluster IP written as a number is a
    malformed object, rejected alone with a message naming it."""
    bad_slice = slice_("web", [endpoint("10.244.1.2")])
    bad_slice["endpoints"][0]["addresses"] = [5]
    with pytest.raises(ManifestError, match=r"endpoints\[0\]\.addresses\[0\]: 5 is not an IP address"):
        parse_endpoint_slice(bad_slice)
    bad_service = service("web", "10.96.0.10")
    bad_service["spec"]["clusterIPs"] = [167772160]
    del bad_service["spec"]["clusterIP"]
    with pytest.raises(ManifestError, match="is not an IP address"):
        parse_service(bad_service)


def test_a_dns_consumer_whose_loop_has_closed_never_fails_an_update():
    """The fast path's wake-up goes through its asyncio loop; once that loop is closed (noded stopping) a
    source's update must still be taken, not rejected."""
    import asyncio

    model = ServiceModel()
    loop = asyncio.new_event_loop()
    changes = model.dns_changes(wake=lambda: loop.call_soon_threadsafe(lambda: None))
    loop.close()
    assert model.upsert(service("web", "10.96.0.10")) is True
    assert changes.take() == {("default", "web")}


def test_cluster_port_names_the_service_port_behind_a_vip_and_agrees_with_cluster_frontend():
    model = ServiceModel()
    model.upsert(service("web", "10.96.0.20", ports=[{"name": "http", "port": 80, "targetPort": 8080}]))
    model.upsert(slice_("web", [endpoint("10.244.1.5")], ports=[{"name": "http", "port": 8080}]))
    found = model.cluster_port("10.96.0.20", 80)
    assert found is not None and (found.name.namespace, found.name.name, found.name.port) == ("default", "web", "http")
    assert found is model.cluster_frontend("10.96.0.20", 80).service
    assert model.cluster_port("10.96.0.20", 81) is None
    assert model.cluster_port("10.96.0.21", 80) is None
    assert model.cluster_port("10.96.0.20", 80, "UDP") is None
    model.delete("Service", "default", "web")
    assert model.cluster_port("10.96.0.20", 80) is None
