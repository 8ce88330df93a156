"""What /metrics reads from a running daemon at scrape time: the families prometheus_client cannot be
pushed (noded/metrics.py's Pulled collector), each under its anchor's name and labels.

- kube-proxy: change counters and what is pending, services with a Local policy and no local endpoint;
- CoreDNS (the resolver): requests, responses by rcode and plugin, request durations, cache entries, hits
  and misses, forwarding per upstream (requests, responses and durations by rcode, health-check failures),
  plus the eBPF fast path's answered and passed queries;
- ztunnel (the tunnel): istio_tcp_connections_opened/closed_total and istio_tcp_sent/received_bytes_total
  with Istio's standard labels, and connections denied by policy;
- the waypoint (Envoy's): istio_requests_total and istio_request_duration_milliseconds with Istio's labels
  (reporter "waypoint", response_code), request and response body bytes, requests denied by L7 policy;
- noded: objects rejected by kind, API errors by kind and class, refused peers, self-calls, HBONE
  connections ended by reason, certificate expiry per identity, BPF map writes, netfilter transactions.
"""

from __future__ import annotations

import datetime
from typing import Any

from noded.tunnel.telemetry import LABELS as TCP_LABELS
from noded.waypoint.telemetry import LABELS as REQUEST_LABELS

DNS_SERVER = "dns://:53"  # CoreDNS's server label: one server block here, every listener
DNS_ZONE = "."


def register_pulled(daemon: Any) -> None:
    add = daemon.metrics.pulled.add
    model = daemon.model

    add(
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        "Cumulative proxy rules Endpoint changes",
        (),
        lambda: {(): model.endpoint_changes},
    )
    add(
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        "Cumulative proxy rules Service changes",
        (),
        lambda: {(): model.service_changes},
    )
    for name in ("endpoint", "service"):  # noded tracks changed services, whichever object changed
        add(
            f"kubeproxy_sync_proxy_rules_{name}_changes_pending",
            "gauge",
            f"Pending proxy rules {name.capitalize()} changes",
            (),
            lambda: {(): daemon.changes.pending() if daemon.changes else 0},
        )
    add(
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        "Number of services with a Local traffic policy and no endpoints",
        ("traffic_policy", "ip_family"),
        model.no_local_endpoints,
    )

    add(
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "counter",
        "Cumulative conntrack flows deleted by conntrack reconciler (the netfilter modes' stale UDP flows)",
        ("ip_family",),
        lambda: {(family,): n for family, n in daemon.proxier.conntrack.deleted.items()},
    )
    add(
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
        "ReconcileConntrackFlowsLatency latency in seconds",
        (),
        lambda: daemon.proxier.conntrack.durations.snapshot(),
    )

    # -- noded's own ----------------------------------------------------------------------------------
    add(
        "noded_rejected_objects_total",
        "counter",
        "Objects rejected alone (malformed or unusable), by kind",
        ("kind",),
        lambda: _summed(daemon.sink.rejected_by_kind, model.rejected_by_kind),
    )
    add(
        "noded_api_errors_total",
        "counter",
        "Kubernetes API request errors, by kind and class (connection, timeout, 401, 403, 404, 410, 429, 5xx)",
        ("kind", "class"),
        lambda: {
            (kind, cls): n
            for kind, s in (daemon.source.status() if hasattr(daemon.source, "status") else {}).items()
            for cls, n in (s.get("errors") or {}).items()
        },
    )
    add(
        "noded_bpf_map_writes_total",
        "counter",
        "BPF map updates and deletes by the eBPF proxier",
        (),
        lambda: {(): getattr(daemon.proxier, "map_writes", 0)},
    )

    fill_memo: list = [0.0, {}]  # one count per scrape for both families

    def map_fill() -> dict[tuple[str], tuple[int, int]]:
        import os
        import time

        from noded.bpf.libbpf import pinned_map_fill

        if time.monotonic() - fill_memo[0] < 1.0:
            return fill_memo[1]
        bpffs = daemon.config.bpffsPath
        out = {}
        for name in sorted(os.listdir(bpffs)) if os.path.isdir(bpffs) else []:
            path = os.path.join(bpffs, name)
            if os.path.isfile(path):  # the maps (links live under links/)
                fill = pinned_map_fill(path)
                if fill is not None:
                    out[(name,)] = fill
        fill_memo[:] = [time.monotonic(), out]
        return out

    for metric, index, text in (
        ("noded_bpf_map_entries", 0, "Entries in each of noded's pinned BPF maps"),
        ("noded_bpf_map_max_entries", 1, "Capacity of each of noded's pinned BPF maps"),
    ):
        add(metric, "gauge", text, ("map",), lambda index=index: {k: v[index] for k, v in map_fill().items()})
    add(
        "noded_netfilter_transactions_total",
        "counter",
        "nft or iptables-restore transactions by the netfilter proxiers",
        (),
        lambda: {(): getattr(daemon.proxier, "transactions", 0)},
    )
    add(
        "noded_tunnel_refused_peers_total",
        "counter",
        "HBONE servers refused for presenting another identity than the destination's",
        (),
        lambda: {(): daemon._refusals()["refusedPeers"]},
    )
    add(
        "noded_capture_self_calls_total",
        "counter",
        "Connections of a pod to its own capture listeners, refused",
        (),
        lambda: {(): daemon._refusals()["selfCalls"]},
    )
    add(
        "noded_hbone_connections_ended_total",
        "counter",
        "HBONE connections ended for protocol errors and abuse, by GOAWAY reason",
        ("reason",),
        lambda: {(str(reason),): n for reason, n in daemon._refusals()["endedConnections"].items()},
    )
    add(
        "noded_certificate_expiration_timestamp_seconds",
        "gauge",
        "When each workload certificate this node holds expires",
        ("identity",),
        lambda: {
            (c["identity"],): datetime.datetime.fromisoformat(c["notAfter"]).timestamp()
            for c in (daemon.identities.status()["certificates"] if daemon.identities else [])
        },
    )

    # -- CoreDNS's, for the resolver --------------------------------------------------------------------
    def resolver():
        return daemon.dns.resolver

    add(
        "coredns_dns_requests_total",
        "counter",
        "Counter of DNS requests made per zone, protocol and family",
        ("server", "zone", "view", "proto", "family", "type"),
        lambda: {(DNS_SERVER, DNS_ZONE, "", *k): n for k, n in resolver().stats.requests.items()},
    )
    add(
        "coredns_dns_responses_total",
        "counter",
        "Counter of response status codes",
        ("server", "zone", "view", "rcode", "plugin"),
        lambda: {(DNS_SERVER, DNS_ZONE, "", *k): n for k, n in resolver().stats.responses.items()},
    )
    add(
        "coredns_dns_request_duration_seconds",
        "histogram",
        "Histogram of the time (in seconds) each request took",
        ("server", "zone", "view", "type"),
        lambda: {(DNS_SERVER, DNS_ZONE, "", *k): v for k, v in resolver().stats.duration_snapshot().items()},
    )
    add(
        "coredns_cache_entries",
        "gauge",
        "The number of elements in the cache",
        ("server", "type", "zones", "view"),
        lambda: {(DNS_SERVER, t, DNS_ZONE, ""): n for t, n in resolver().cache.entries().items()},
    )
    add(
        "coredns_cache_hits_total",
        "counter",
        "The count of cache hits",
        ("server", "type", "zones", "view"),
        lambda: {(DNS_SERVER, t, DNS_ZONE, ""): n for t, n in resolver().cache.hits_by_type.items()},
    )
    add(
        "coredns_cache_misses_total",
        "counter",
        "The count of cache misses",
        ("server", "zones", "view"),
        lambda: {(DNS_SERVER, DNS_ZONE, ""): resolver().cache.misses},
    )
    add(
        "coredns_forward_requests_total",
        "counter",
        "Counter of requests made per upstream",
        ("to",),
        lambda: {(u.address,): u.queries for u in resolver().upstreams.all},
    )
    add(
        "coredns_forward_responses_total",
        "counter",
        "Counter of responses received per upstream",
        ("to", "rcode"),
        lambda: {k: v[1][-1] for k, v in resolver().upstreams.latency.snapshot().items()},
    )
    add(
        "coredns_forward_request_duration_seconds",
        "histogram",
        "Histogram of the time each request took",
        ("to", "rcode"),
        lambda: resolver().upstreams.latency.snapshot(),
    )
    add(
        "coredns_forward_healthcheck_failures_total",
        "counter",
        "Counter of the number of failed healthchecks",
        ("to",),
        lambda: {(u.address,): u.healthcheck_failures for u in resolver().upstreams.all},
    )
    for name, field, text in (
        ("noded_dns_fastpath_answered_total", "answered", "DNS queries answered by the eBPF fast path"),
        ("noded_dns_fastpath_passed_total", "passed", "DNS queries the eBPF fast path passed to the resolver"),
        (
            "noded_dns_fastpath_cache_answered_total",
            "cachedAnswered",
            "DNS queries for external names answered by the eBPF fast path from its cache",
        ),
        (
            "noded_dns_fastpath_cache_expired_total",
            "cacheExpired",
            "Expired entries the eBPF fast path found in its cache (removed; the query went to the resolver)",
        ),
    ):
        add(name, "counter", text, (), lambda field=field: {(): daemon.dns.fast.stats()[field]})

    # -- ztunnel's, for the tunnel ----------------------------------------------------------------------
    def telemetry():
        return daemon.tunnel.telemetry

    for name, attr, text in (
        ("istio_tcp_connections_opened_total", "opened", "The total number of TCP connections opened"),
        ("istio_tcp_connections_closed_total", "closed", "The total number of TCP connections closed"),
        (
            "istio_tcp_sent_bytes_total",
            "response_bytes",
            "Size of total bytes sent during response in case of a TCP connection",
        ),
        (
            "istio_tcp_received_bytes_total",
            "request_bytes",
            "Size of total bytes received during request in case of a TCP connection",
        ),
    ):
        add(name, "counter", text, TCP_LABELS, lambda attr=attr: dict(getattr(telemetry(), attr)))

    # -- Istio's request metrics, for the waypoint ----------------------------------------------------------
    def requests():
        return daemon.tunnel.waypoints.telemetry

    add(
        "istio_requests_total",
        "counter",
        "Total requests handled by an Istio proxy",
        REQUEST_LABELS,
        lambda: dict(requests().requests),
    )
    add(
        "istio_request_duration_milliseconds",
        "histogram",
        "Histogram of request durations in milliseconds",
        REQUEST_LABELS,
        lambda: requests().duration.snapshot(),
    )
    add(
        "istio_request_bytes_sum_total",
        "counter",
        "Bytes of request bodies (the sum of Istio's istio_request_bytes histogram)",
        REQUEST_LABELS,
        lambda: dict(requests().request_bytes),
    )
    add(
        "istio_response_bytes_sum_total",
        "counter",
        "Bytes of response bodies (the sum of Istio's istio_response_bytes histogram)",
        REQUEST_LABELS,
        lambda: dict(requests().response_bytes),
    )
    add(
        "noded_waypoint_denied_requests_total",
        "counter",
        "Requests the waypoint's L7 AuthorizationPolicies denied",
        (),
        lambda: {(): daemon.tunnel.waypoints.counts["denied"]},
    )
    add(
        "noded_tunnel_denied_connections_total",
        "counter",
        "Connections denied by AuthorizationPolicy",
        (),
        lambda: {(): daemon.tunnel.counts["denied"]},
    )


def _summed(*counts: dict[str, int]) -> dict[tuple[str], int]:
    out: dict[tuple[str], int] = {}
    for c in counts:
        for kind, n in list(c.items()):
            out[(kind,)] = out.get((kind,), 0) + n
    return out
