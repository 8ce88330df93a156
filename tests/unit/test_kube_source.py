"""The Kubernetes API source against a local server speaking the real list/watch protocol."""

import time

import structlog.testing

from noded.model.tracker import ZONE_LABEL, Frontend, ServiceModel
from noded.sources import kube
from noded.sources.kubeclient import ApiClient
from tests.objects import endpoint, service, slice_


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


class FakeSink:
    def __init__(self):
        self.model = ServiceModel()
        self.synced_sources = []

    def upsert(self, obj):
        return self.model.upsert(obj)

    def delete(self, kind, ns, name):
        self.model.delete(kind, ns, name)

    def synced(self, source):
        self.synced_sources.append(source)


def start_source(api, sink, node_name="node1"):
    src = kube.KubeSource(ApiClient(api.url), sink, max_backoff=0.5, node_name=node_name)
    src.start()
    return src


def frontends(sink, name):
    return sink.model.frontends_of(("default", name))


def test_list_then_watch_add_modify_delete(api):
    api.put(service("web"))
    api.put(slice_("web", [endpoint("10.244.1.2")]))
    sink = FakeSink()
    src = start_source(api, sink)
    try:
        wait_for(lambda: src.synced)
        assert sink.synced_sources == ["kubernetes"]
        fe = Frontend("10.96.0.10", 80, "TCP")
        assert frontends(sink, "web")[fe].ready == (("10.244.1.2", 8080),)
        api.put(slice_("web", [endpoint("10.244.1.2"), endpoint("10.244.2.2")]))
        wait_for(lambda: len(frontends(sink, "web")[fe].ready) == 2)
        api.remove("Service", "default", "web")
        wait_for(lambda: frontends(sink, "web") == {})
        assert any("watch=true" in r and "allowWatchBookmarks=true" in r for r in api.requests)
    finally:
        src.stop()


def node(name, zone):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {ZONE_LABEL: zone}}}


def test_only_this_nodes_node_object_is_watched_for_its_zone(api):
    api.put(node("node1", "zone-a"))
    api.put(node("node2", "zone-b"))
    sink = FakeSink()
    sink.model.node_name = "node1"
    src = start_source(api, sink)
    try:
        wait_for(lambda: src.synced)
        wait_for(lambda: sink.model.node_zone == "zone-a")  # Nodes list beside the services' first sync
        api.put(node("node2", "zone-c"))
        api.put(node("node1", "zone-d"))
        wait_for(lambda: sink.model.node_zone == "zone-d")
        node_requests = [r for r in api.requests if r.startswith("/api/v1/nodes")]
        assert node_requests and all("fieldSelector=metadata.name%3Dnode1" in r for r in node_requests)
    finally:
        src.stop()


def test_paginated_list(api):
    for i in range(1, 1201):
        api.put(service(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}"))
    sink = FakeSink()
    src = start_source(api, sink)
    try:
        wait_for(lambda: src.synced)
        assert sink.model.counts()[0] == 1200
        assert sum("continue=" in r for r in api.requests if "services" in r) == 2
    finally:
        src.stop()


def test_a_long_list_logs_its_progress_and_timing(api, monkeypatch):
    for i in range(1, 1201):
        api.put(service(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}"))
    monkeypatch.setattr(kube, "PROGRESS_EVERY", 0.0)  # every page counts as slow
    sink = FakeSink()
    with structlog.testing.capture_logs() as logs:
        src = start_source(api, sink)
        try:
            wait_for(lambda: src.synced)
        finally:
            src.stop()
    progress = [e for e in logs if e["event"] == "listing" and e["kind"] == "Service"]
    assert [e["objects"] for e in progress] == [500, 1000]
    assert [e["remaining"] for e in progress] == [700, 200]
    listed = next(e for e in logs if e["event"] == "listed" and e["kind"] == "Service")
    assert listed["objects"] == 1200 and listed["list_seconds"] >= 0 and listed["apply_seconds"] >= 0


def test_bookmark_moves_resource_version(api):
    sink = FakeSink()
    src = start_source(api, sink)
    try:
        wait_for(lambda: src.synced)
        watcher = src.watchers["Service"]
        before = int(watcher.resource_version)
        api.bookmark()
        wait_for(lambda: int(watcher.resource_version) > before)
    finally:
        src.stop()


def test_410_gone_relists_and_applies_the_difference(api):
    api.put(service("keep", "10.96.0.1"))
    api.put(service("gone", "10.96.0.2"))
    sink = FakeSink()
    src = start_source(api, sink)
    try:
        wait_for(lambda: src.synced)
        watcher = src.watchers["Service"]
        # While the watch is cut, history is compacted and objects change.
        api.stop()
        api.remove("Service", "default", "gone")
        api.put(service("new", "10.96.0.3"))
        api.compact()
        api.start(api.port)
        wait_for(lambda: watcher.relists >= 2)
        wait_for(lambda: frontends(sink, "gone") == {} and frontends(sink, "new") != {})
        assert frontends(sink, "keep") != {}
        assert watcher.reconnects >= 1
    finally:
        src.stop()


def test_reconnect_resumes_from_last_version_without_relist(api):
    api.put(service("web"))
    sink = FakeSink()
    src = start_source(api, sink)
    try:
        wait_for(lambda: src.synced)
        watcher = src.watchers["Service"]
        api.drop_watches()
        api.put(service("web2", "10.96.0.20"))
        wait_for(lambda: frontends(sink, "web2") != {})
        assert watcher.relists == 1
    finally:
        src.stop()


def test_malformed_object_from_api_rejected_alone(api):
    api.put(service("good", "10.96.0.1"))
    bad = service("bad", "10.96.0.2")
    bad["spec"]["ports"][0]["protocol"] = "QUIC"
    api.put(bad)
    sink = FakeSink()
    src = start_source(api, sink)
    try:
        wait_for(lambda: src.synced)
        assert frontends(sink, "good") != {}
        assert frontends(sink, "bad") == {}
        assert sink.model.rejected == 1
    finally:
        src.stop()


class RecordingSink(FakeSink):
    def __init__(self):
        super().__init__()
        self.others = {}

    def upsert(self, obj):
        if obj["kind"] in ("Pod", "AuthorizationPolicy"):
            self.others[(obj["kind"], obj["metadata"]["name"])] = obj
            return True
        return super().upsert(obj)

    def delete(self, kind, ns, name):
        if self.others.pop((kind, name), None) is None:
            super().delete(kind, ns, name)


def mesh_source(api, sink):
    kinds = ("Service", "Pod", "AuthorizationPolicy")
    src = kube.KubeSource(ApiClient(api.url), sink, kinds=kinds, max_backoff=0.5, node_name="node1")
    src.start()
    return src


def policy(name):
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"action": "ALLOW"},
    }


def pod(name, node):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node},
    }


def test_authorization_policies_and_every_nodes_pods_are_watched(api):
    api.put(policy("p1"))
    api.put(pod("here", "node1"))
    api.put(pod("there", "node2"))  # the tunnel needs to know meshed pods on other nodes too
    sink = RecordingSink()
    src = mesh_source(api, sink)
    try:
        wait_for(lambda: sink.synced_sources == ["kubernetes"])  # Services and EndpointSlices listed
        wanted = {("AuthorizationPolicy", "p1"), ("Pod", "here"), ("Pod", "there")}
        wait_for(lambda: set(sink.others) == wanted)  # the other kinds as they list
        assert src.kind_synced("Pod") and src.kind_synced("AuthorizationPolicy")
        api.remove("AuthorizationPolicy", "default", "p1")
        wait_for(lambda: ("AuthorizationPolicy", "p1") not in sink.others)
    finally:
        src.stop()


def test_a_node_taking_other_nodes_pods_from_the_ca_watches_its_own_pods_only(api):
    """Issue 19's cluster scale: with own_pods_only the Pod list and watch carry the field selector
    spec.nodeName, so another node's pod (and its changes) never reaches this node from the API server."""
    api.put(pod("here", "node1"))
    api.put(pod("there", "node2"))
    sink = RecordingSink()
    src = kube.KubeSource(
        ApiClient(api.url), sink, kinds=("Service", "EndpointSlice", "Pod"), node_name="node1", own_pods_only=True
    )
    src.start()
    try:
        wait_for(lambda: src.kind_synced("Pod"))
        api.put(pod("there-too", "node2"))
        api.put(pod("here-too", "node1"))
        wait_for(lambda: ("Pod", "here-too") in sink.others)
        assert set(sink.others) == {("Pod", "here"), ("Pod", "here-too")}
        pod_requests = [r for r in api.requests if r.startswith("/api/v1/pods")]
        assert pod_requests and all("fieldSelector=spec.nodeName%3Dnode1" in r for r in pod_requests)
        assert any("watch=true" in r for r in pod_requests)
    finally:
        src.stop()


def test_a_cluster_without_the_policy_crd_still_syncs_and_finds_it_later(api):
    path = "/apis/security.istio.io/v1/authorizationpolicies"
    api.hidden.add(path)
    api.put(service("web"))
    api.put(policy("p1"))
    sink = RecordingSink()
    src = mesh_source(api, sink)
    try:
        wait_for(lambda: sink.synced_sources == ["kubernetes"])
        assert frontends(sink, "web") and ("AuthorizationPolicy", "p1") not in sink.others
        api.hidden.discard(path)  # the CRD installed: picked up at the next look
        wait_for(lambda: ("AuthorizationPolicy", "p1") in sink.others)
    finally:
        src.stop()


def test_a_first_list_is_applied_page_by_page_and_one_broken_off_is_finished_whole(api, monkeypatch):
    """The first list goes to the sink a page at a time (a big cluster's list is never held whole: at most
    the page being applied and the next one, asked for meanwhile); if it breaks off, the next list is applied
    as a snapshot, so what vanished in between is deleted."""
    monkeypatch.setattr(kube, "PAGE_SIZE", 10)
    for i in range(30):
        api.put(pod(f"p{i:02d}", "node1"))
    seen_before_listed = []

    class Sink(RecordingSink):
        def upsert(self, obj):
            name = obj["metadata"]["name"]
            if name == "p05" and not getattr(self, "broke", False):  # on the first page
                pages = [r for r in api.requests if r.startswith("/api/v1/pods") and "watch" not in r]
                seen_before_listed.append(len(pages))
                self.broke = True
                api.remove("Pod", "default", "p03")  # gone from the cluster, already applied
                api.fail("/api/v1/pods", 500)  # and a later page fails (the second, or the third)
            return super().upsert(obj)

    sink = Sink()
    src = kube.KubeSource(ApiClient(api.url), sink, kinds=("Service", "Pod"), max_backoff=0.2, node_name="n")
    src.start()
    try:
        wait_for(lambda: src.kind_synced("Pod"))
        assert seen_before_listed[0] <= 2  # this page, and at most the next one asked for
        names = {name for kind, name in sink.others if kind == "Pod"}
        assert names == {f"p{i:02d}" for i in range(30)} - {"p03"}
        assert src.watchers["Pod"].relists == 1 and src.watchers["Pod"].errors["5xx"] == 1
    finally:
        src.stop()
