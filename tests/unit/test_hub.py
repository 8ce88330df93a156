"""The hub (noded/model/hub.py): every kind to its owners, each owner telling its own consumers, and a
refused or poisonous object rejected alone."""

from noded.model.hub import Hub, Route
from noded.model.pods import LABEL, Enrollment
from noded.model.tracker import ServiceModel
from tests.objects import endpoint, service, slice_


def namespace(name: str, labels: dict) -> dict:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, node: str, labels: dict | None = None) -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"nodeName": node},
        "status": {"podIP": "10.244.1.7"},
    }


def hub() -> Hub:
    return Hub(ServiceModel(node_name="node1"), Enrollment("node1"))


def test_a_service_reaches_the_model_and_the_waypoint_labels_and_wakes_only_the_model_s_trackers():
    h = hub()
    proxier, woken = h.model.frontend_changes(wake=lambda: woken.append("proxier")), []
    h.enrollment.watchers.append(lambda: woken.append("pods"))
    svc = service("web", "10.96.0.1")
    svc["metadata"]["labels"] = {"istio.io/use-waypoint": "wp"}
    assert h.upsert(svc) and h.upsert(slice_("web", [endpoint("10.244.1.2")]))
    assert proxier.take() == {("default", "web")} and woken == ["proxier"]
    assert h.waypoints.service_labels[("default", "web")] == "wp"
    h.delete("Service", "default", "web")
    assert ("default", "web") not in h.waypoints.service_labels and proxier.take() == {("default", "web")}


def test_enrollment_watchers_hear_of_this_node_s_pods_and_namespaces_changing_and_nothing_else():
    h = hub()
    woken: list[int] = []
    h.enrollment.watchers.append(lambda: woken.append(1))
    h.upsert(namespace("default", {LABEL: "ambient"}))
    h.upsert(namespace("default", {LABEL: "ambient"}))  # the same again: no change
    assert len(woken) == 1 and h.enrollment.enrolled_namespaces() == ["default"]
    h.upsert(pod("here", "node1"))
    h.upsert(pod("there", "node2"))  # another node's pod: known (the tunnel's), no capture to change
    assert len(woken) == 2 and h.enrollment.enrolled("default", "here")
    h.delete("Pod", "default", "here")
    h.delete("Namespace", "", "default")
    assert len(woken) == 4


def test_a_policy_that_does_not_parse_is_in_force_failing_closed_and_counted_as_rejected():
    h = hub()
    bad = {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["eighty"]}}]}]},
    }
    assert not h.upsert(bad)
    assert h.rejected_by_kind["AuthorizationPolicy"] == 1 and "default/bad" in h.policies.policies
    assert "failing closed" in h.last_rejected["AuthorizationPolicy default/bad"]


def test_an_owner_that_raises_rejects_that_object_alone():
    h = hub()

    def broken(_obj: dict) -> bool:
        raise KeyError("a parser bug")

    h.routes = {**h.routes, "Pod": (Route(broken, h.enrollment.delete),)}
    assert not h.upsert(pod("p", "node1"))
    assert h.upsert(service("web", "10.96.0.1"))  # the objects around it still go in
    assert h.rejected_by_kind["Pod"] == 1 and "a parser bug" in h.last_rejected["Pod default/p"]


def test_sources_synced_only_when_every_expected_one_said_so():
    h = hub()
    h.expected = {"directory", "kube"}
    h.synced("kube")
    assert not h.all_synced.is_set()
    h.synced("directory")
    assert h.all_synced.is_set()
