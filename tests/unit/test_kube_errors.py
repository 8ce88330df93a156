"""The API source as client-go users expect it, against the test API server (the real list/watch protocol):
in cluster over HTTPS with the service account's token and CA, and each error class handled on its own
(issue 16, items 3 and 4)."""

from __future__ import annotations

import time

from noded.model.hub import Hub
from noded.model.pods import Enrollment
from noded.model.tracker import ServiceModel
from noded.sources import kube, kubeclient
from noded.sources.kubeclient import ApiClient
from noded.tunnel.policy import Authorizer
from tests.fakeapi import FakeApiServer, serving_cert
from tests.objects import endpoint, service, slice_
from tests.unit.test_kube_source import wait_for

SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"


def sink() -> Hub:
    return Hub(ServiceModel(node_name="node1"), Enrollment("node1"), Authorizer())


def start(api_client, model_sink, kinds=("Service", "EndpointSlice", "Node")):
    src = kube.KubeSource(api_client, model_sink, kinds=kinds, max_backoff=0.4, node_name="node1")
    src.start()
    return src


def plain(api):
    return ApiClient(api.url)


def web_source(api):
    """Service web and its slice in the API; a source started on it: (its sink, the source)."""
    api.put(service("web"))
    api.put(slice_("web", [endpoint("10.244.1.2")]))
    s = sink()
    return s, start(plain(api), s)


def test_in_cluster_over_https_with_the_service_account_token_and_ca(tmp_path):
    """The in-cluster path for real: token and CA files where a pod has them, HTTPS, a bearer token; the
    API server's address from the config (never the kubernetes ClusterIP)."""
    ca, cert, key = serving_cert(tmp_path)
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "ca.crt").write_bytes(open(ca, "rb").read())  # noqa: SIM115
    (secrets / "token").write_text("s3cr3t-token")
    api = FakeApiServer(tls=(cert, key), token="s3cr3t-token")
    api.start()
    try:
        api.put(service("web"))
        api.put(slice_("web", [endpoint("10.244.1.2")]))
        s = sink()
        src = start(kubeclient.load(None, True, api_server=api.url, secrets=str(secrets)), s)
        try:
            wait_for(lambda: src.synced)
            assert s.model.frontends_of(("default", "web"))
        finally:
            src.stop()
        # the wrong token: 401 on every kind, counted, nothing synced
        (secrets / "token").write_text("stale")
        s = sink()
        src = start(kubeclient.load(None, True, api_server=api.url, secrets=str(secrets)), s)
        try:
            wait_for(lambda: src.watchers["Service"].errors["401"] >= 2)
            assert not src.synced and "401 on list services" in src.last_error
        finally:
            src.stop()
    finally:
        api.stop()


def test_a_403_on_one_kind_does_not_stop_the_others(api):
    """A Node list the node's identity may not make (a 403) neither holds back the services' first sync nor
    the other kinds; it is retried with backoff, named with its verb and resource."""
    api.fail(NODES, 403, times=1000)
    s, src = web_source(api)
    try:
        wait_for(lambda: src.synced)
        assert s.model.frontends_of(("default", "web"))
        wait_for(lambda: src.watchers["Node"].errors["403"] >= 3)
        assert src.status()["Node"]["lastError"].startswith("403 on list nodes")
        assert not src.kind_synced("Node") and src.kind_synced("Service")
    finally:
        src.stop()


def test_an_essential_kind_forbidden_holds_the_first_sync_until_it_lists(api):
    api.fail(SLICES, 403, times=3)
    _s, src = web_source(api)
    try:
        wait_for(lambda: src.watchers["EndpointSlice"].errors["403"] == 3)
        wait_for(lambda: src.synced)  # once the slices list, the first sync goes ahead
        assert src.watchers["EndpointSlice"].last_error is None
    finally:
        src.stop()


def test_429_is_retried_after_what_retry_after_says_and_5xx_with_backoff(api):
    api.put(service("web"))
    api.fail("/api/v1/services", 429, times=1, headers={"Retry-After": "1"})
    api.fail(SLICES, 503, times=2)
    s = sink()
    started = time.monotonic()
    src = start(plain(api), s)
    try:
        wait_for(lambda: src.synced)
        assert time.monotonic() - started >= 1.0  # the Service list waited the second it was told to
        # (urllib3 under the client honours Retry-After on 429 itself; the watcher does for what reaches it)
        assert sum(r.startswith("/api/v1/services?") for r in api.requests) >= 2
        assert src.watchers["EndpointSlice"].errors == {"5xx": 2}
    finally:
        src.stop()


def test_error_classes():
    class E(Exception):
        def __init__(self, status, headers=None):
            super().__init__(f"status {status}")
            self.status, self.headers = status, headers or {}

    assert kube.classify(E(429, {"Retry-After": "7"})) == ("429", 7.0)
    assert kube.classify(E(429, {"Retry-After": "9999"})) == ("429", kube.RETRY_AFTER_MAX)
    assert kube.classify(E(503, {"Retry-After": "2"})) == ("5xx", 2.0)
    assert kube.classify(E(403)) == ("403", None)
    assert kube.classify(E(401)) == ("401", None)
    assert kube.classify(TimeoutError("timed out")) == ("timeout", None)
    assert kube.classify(ConnectionRefusedError(111, "refused")) == ("connection", None)
    assert kube.WatchedKind("AuthorizationPolicy", "security.istio.io/v1", None).resource == (
        "security.istio.io/authorizationpolicies"
    )
    assert kube.WatchedKind("EndpointSlice", "discovery.k8s.io/v1", None).resource == "discovery.k8s.io/endpointslices"
