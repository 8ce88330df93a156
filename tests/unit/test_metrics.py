"""The metrics registry: pulled families render as Prometheus text a parser reads back, a failing source
is left out alone, hot-path histograms are cumulative, tunnel label sets are bounded, workload names as
Istio derives them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from noded.metrics import DaemonMetrics, LatencyHistogram
from noded.model.pods import workload_name
from noded.tunnel import telemetry


def parsed(metrics: DaemonMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def test_pulled_families_render_and_a_failing_source_is_left_out():
    m = DaemonMetrics()
    m.pulled.add("noded_things_total", "counter", "Things", ("kind",), lambda: {("a",): 2, ("b",): 3})
    m.pulled.add("noded_level", "gauge", "A level", (), lambda: {(): 7.5})
    m.pulled.add("noded_broken_total", "counter", "Broken", (), lambda: 1 / 0)
    h = LatencyHistogram((0.001, 0.01))
    for v in (0.0005, 0.005, 0.5):
        h.observe(("A",), v)
    m.pulled.add("noded_latency_seconds", "histogram", "Latency", ("type",), h.snapshot)
    m.proxy.observe_sync(0.002, full=True)
    fams = parsed(m)
    assert {(s.labels["kind"], s.value) for s in fams["noded_things"].samples} == {("a", 2), ("b", 3)}
    assert fams["noded_things"].type == "counter" and fams["noded_things"].documentation == "Things"
    assert fams["noded_level"].samples[0].value == 7.5
    assert "noded_broken" not in fams
    buckets = {s.labels["le"]: s.value for s in fams["noded_latency_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets == {"0.001": 1, "0.01": 2, "+Inf": 3}
    count = next(s.value for s in fams["noded_latency_seconds"].samples if s.name.endswith("_count"))
    assert count == 3
    full = fams["kubeproxy_sync_full_proxy_rules_duration_seconds"]
    assert next(s.value for s in full.samples if s.name.endswith("_count")) == 1
    assert "process_resident_memory_bytes" in fams and "python_info" in fams


def test_tunnel_label_sets_are_bounded(monkeypatch):
    monkeypatch.setattr(telemetry, "MAX_SERIES", 3)
    t = telemetry.TcpTelemetry()
    keys = [t.open(t.key("source", telemetry.Workload(f"w{i}"), telemetry.Workload(), None, True)) for i in range(5)]
    assert len(t.opened) == 4 and keys[-1][1] == telemetry.UNKNOWN  # three kept, the rest folded into one
    t.close(keys[0], 100, 20)
    assert t.request_bytes[keys[0]] == 100 and t.response_bytes[keys[0]] == 20 and t.closed[keys[0]] == 1


def test_workload_names_as_istio_derives_them():
    owner = {"kind": "ReplicaSet", "name": "web-7d4b9c6f5d", "controller": True}
    assert workload_name({"name": "web-7d4b9c6f5d-x2x9z", "ownerReferences": [owner]}) == "web"
    sts = {"name": "db-0", "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]}
    assert workload_name(sts) == "db"
    assert workload_name({"name": "lonely"}) == "lonely"
    odd = {"name": "x", "ownerReferences": [{"kind": "ReplicaSet", "name": "plain", "controller": True}]}
    assert workload_name(odd) == "plain"
    assert telemetry.canonical({"app": "web", "version": "v2"}, "web") == ("web", "v2", "web", "v2")
    assert telemetry.canonical({}, "lonely") == ("lonely", "latest", "unknown", "unknown")


def test_the_grafana_dashboard_graphs_only_families_noded_exports():
    """deploy/grafana-dashboard.json: valid, every panel has a query, and every metric name in a query is
    one /metrics has (kube-proxy's, CoreDNS's, ztunnel's, noded's, the process collector's)."""
    import json
    import os
    import re
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from noded.daemon_metrics import register_pulled

    path = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "grafana-dashboard.json")
    with open(path) as f:
        dashboard = json.load(f)
    pushed = {f.name for f in text_string_to_metric_families(DaemonMetrics().render().decode())}
    metrics = DaemonMetrics()
    register_pulled(SimpleNamespace(metrics=metrics, model=MagicMock()))  # the names only: nothing read
    exported = set(metrics.pulled.sources) | pushed
    exported |= {f"{n}_total" for n in exported} | {f"{n}_{s}" for n in exported for s in ("bucket", "sum", "count")}
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\b((?:kubeproxy|coredns|istio|noded|process)_[a-z_]+)", target["expr"]))
    assert used and not used - exported, sorted(used - exported)
    assert {"kubeproxy_sync_proxy_rules_duration_seconds_bucket", "coredns_dns_requests_total"} <= used
    assert any(name.startswith("istio_tcp_") for name in used)


def test_the_traffic_graph_counts_a_connection_once_whoever_reports_it():
    """Both ends of a mesh connection report it: the destination's report wins; a source's report stands
    where no destination reported (a destination outside the mesh); denied edges are marked."""
    from noded import graph

    client = telemetry.Workload("client", "default", "spiffe://cluster.local/ns/default/sa/c", "client")
    server = telemetry.Workload("server", "default", "spiffe://cluster.local/ns/default/sa/s", "server")
    plain = telemetry.Workload("plain", "default")
    node1, node2 = telemetry.TcpTelemetry(), telemetry.TcpTelemetry()
    for t, reporter in ((node1, "source"), (node2, "destination")):
        key = t.open(t.key(reporter, client, server, ("server", "default"), True))
        t.close(key, 100, 10)
    node1.close(node1.open(node1.key("source", client, plain, None, False)), 5, 1)
    node2.deny(telemetry.Workload("outsider", "other"), server, True)
    merged = graph.merge([graph.snapshot(node1, "node1"), graph.snapshot(node2, "node2")])
    edges = {(e["source"], e["target"], e["security"]): e for e in merged["edges"]}
    mesh = edges[("default/client", "default/server", "mutual_tls")]
    assert (mesh["opened"], mesh["bytes"], mesh["service"]) == (1, 110, "server.default.svc.cluster.local")
    assert edges[("default/client", "default/plain", "unknown")]["opened"] == 1
    assert edges[("other/outsider", "default/server", "mutual_tls")]["denied"] == 1
    kinds = {n["id"]: n["kind"] for n in merged["nodes"]}
    assert kinds["svc:server.default.svc.cluster.local"] == "service" and kinds["default/client"] == "workload"
    assert merged["reporters"] == ["node1", "node2"]
