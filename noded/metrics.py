"""The /metrics families, through prometheus_client, under the names operators already graph.

One registry per daemon: the process and Python collectors, kube-proxy's `kubeproxy_*` set (pushed by the
sync loop, which is not a hot path), and a collector that reads the DNS side, the tunnel and noded's own
counters at scrape time (CoreDNS's `coredns_*`, ztunnel's `istio_tcp_*`, `noded_*`): the per-query and
per-connection paths only bump plain counters of their own, so metrics cost them nothing measurable.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Hashable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# kube-proxy's buckets: exponential from 1 ms for sync duration; programming latency up to 5 minutes
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
PROGRAMMING_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# CoreDNS's request duration buckets (plugin/pkg/dnsutil): 0.25 ms doubling to ~8 s
DNS_BUCKETS = tuple(0.00025 * 2**i for i in range(16))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProxyMetrics:
    """kube-proxy's families: sync durations (all, full, partial), network programming latency, the last
    queued and last sync timestamps, changes pending and total, sync failures, healthz/livez answers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.sync, self.full, self.partial = (
            Histogram(f"kubeproxy_sync{kind}_proxy_rules_duration_seconds", text, buckets=SYNC_BUCKETS, registry=r)
            for kind, text in (
                ("", "SyncProxyRules latency in seconds"),
                ("_full", "SyncProxyRules latency in seconds for full resyncs"),
                ("_partial", "SyncProxyRules latency in seconds for partial resyncs"),
            )
        )
        self.programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=r,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            registry=r,
        )
        self.failures = Counter(
            "kubeproxy_sync_proxy_rules_failures",  # exposed as ..._failures_total
            "Cumulative proxy rules sync failures (noded: any services mode)",
            registry=r,
        )
        self.healthz = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=r)
        self.livez = Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        self.last_sync_timestamp = 0.0  # wall clock of the last good sync (healthz, livez, status)
        self.last_sync_seconds: float | None = None

    def observe_sync(self, seconds: float, full: bool = False, changed_since: float | None = None) -> None:
        """One sync took `seconds`; the oldest change it applied arrived at monotonic `changed_since`."""
        self.sync.observe(seconds)
        (self.full if full else self.partial).observe(seconds)
        if changed_since is not None:
            self.programming.observe(max(0.0, time.monotonic() - changed_since))
        self.last_sync_timestamp = time.time()
        self.last_sync_seconds = seconds
        self.last_sync.set(self.last_sync_timestamp)

    def queued(self) -> None:
        self.last_queued.set(time.time())


class Pulled(Collector):
    """Families read at scrape time from `sources`: name -> (type, help, labels, callable returning
    {label values tuple: value}) for counters and gauges, or for histograms a callable returning
    {label values tuple: (bucket bounds, cumulative counts, sum)}. A source that fails is left out of
    that scrape, never failing the others."""

    def __init__(self) -> None:
        self.sources: dict[str, tuple[str, str, tuple[str, ...], Callable[[], dict]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: Iterable[str], read: Callable[[], dict]) -> None:
        self.sources[name] = (kind, help_text, tuple(labels), read)

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only: no registration-time checks against values

    def collect(self) -> Iterable[Metric]:
        for name, (kind, help_text, labels, read) in self.sources.items():
            try:
                values = read()
            except Exception:  # a part that is not there (no capture, no DNS) or failing: skipped
                continue
            if kind == "histogram":
                fam = HistogramMetricFamily(name, help_text, labels=labels)
                for key, (bounds, cumulative, total) in values.items():  # cumulative: one more, for +Inf
                    buckets = [(repr(float(b)), c) for b, c in zip(bounds, cumulative, strict=False)]
                    fam.add_metric(list(key), [*buckets, ("+Inf", cumulative[-1])], total)
                yield fam
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = family(name.removesuffix("_total") if kind == "counter" else name, help_text, labels=labels)
            for key, value in values.items():
                fam.add_metric(list(key), value)
            yield fam


class DaemonMetrics:
    """The daemon's registry: process and Python collectors, kube-proxy's families, and the pulled ones."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.proxy = ProxyMetrics(self.registry)
        self.pulled = Pulled()
        self.registry.register(self.pulled)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyHistogram:
    """A histogram for a hot path: plain cumulative-at-read bucket counts per key (a label tuple, or any
    hashable the reader maps to labels: an int costs no allocation), no lock (the DNS loop is one thread; a
    scrape reading a count mid-update is off by one at most)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: dict[Hashable, list[int]] = {}
        self.sums: dict[Hashable, float] = {}

    def observe(self, key: Hashable, value: float) -> None:
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = [0] * (len(self.bounds) + 1)
            self.sums[key] = 0.0
        counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value; past the last: +Inf
        self.sums[key] += value

    def snapshot(self) -> dict[Hashable, tuple[tuple[float, ...], list[int], float]]:
        """key -> (bounds, cumulative counts with +Inf last, sum), as the Pulled collector reads histograms."""
        return {
            key: (self.bounds, list(itertools.accumulate(counts)), self.sums.get(key, 0.0))
            for key, counts in list(self.counts.items())
        }
