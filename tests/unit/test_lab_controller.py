"""The lab's API-server stand-in: cluster IP families as the API server allocates them."""

from noded.lab import controller


def svc(name, **spec):
    return {"kind": "Service", "metadata": {"name": name}, "spec": {"ports": [{"port": 80}], **spec}}


def test_single_stack_ipv4_by_default_dual_stack_and_ipv6_on_request():
    state: dict = {}
    docs = controller.allocate_service_fields(
        [
            svc("v4"),
            svc("dual", ipFamilyPolicy="PreferDualStack"),
            svc("v6", ipFamilies=["IPv6"]),
            svc("v6first", ipFamilies=["IPv6"], ipFamilyPolicy="RequireDualStack", type="LoadBalancer"),
        ],
        state,
    )
    spec = {d["metadata"]["name"]: d["spec"] for d in docs}
    assert spec["v4"]["ipFamilies"] == ["IPv4"] and spec["v4"]["clusterIPs"] == [
        "10.96.0.11"
    ]  # .10: the cluster DNS address
    assert spec["dual"]["ipFamilies"] == ["IPv4", "IPv6"]
    assert spec["dual"]["clusterIPs"] == ["10.96.0.12", "fd96::b"]
    assert spec["v6"]["clusterIP"] == "fd96::c" and spec["v6"]["ipFamilyPolicy"] == "SingleStack"
    assert spec["v6first"]["clusterIPs"] == ["fd96::d", "10.96.0.13"]
    lb = next(d for d in docs if d["metadata"]["name"] == "v6first")["status"]["loadBalancer"]["ingress"]
    assert lb == [{"ip": "10.77.100.1"}, {"ip": "fd77:100::1"}]
    # stable on the next pass, as the API server keeps a service's addresses
    again = controller.allocate_service_fields([svc("dual", ipFamilyPolicy="PreferDualStack")], state)
    assert again[0]["spec"]["clusterIPs"] == ["10.96.0.12", "fd96::b"]
