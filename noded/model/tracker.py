"""The change-tracked service model: what sources told us, which services changed, and their desired frontends.

Sources call upsert/delete with plain objects; the sync runner calls
take_changes() and frontends_of() for just the services that changed. Pure:
no kernel, no I/O but a log line for a rejected object.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from noded.model.objects import (
    DnsService,
    Endpoint,
    EndpointSlice,
    ManifestError,
    ServicePort,
    object_ref,
    parse_endpoint_slice,
    parse_service_views,
)

log = structlog.get_logger("noded.model")

ServiceKey = tuple[str, str]  # (namespace, name)
Backend = tuple[str, int]  # (address, port)


@dataclass(frozen=True, slots=True)
class Frontend:
    ip: str
    port: int
    protocol: str
    scope: int = 0  # eBPF only: 0 for this node's sockets, 1 for packets arriving from outside (tc)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


Backends = tuple[tuple[Backend, ...], tuple[Backend, ...]]  # (ready, serving-terminating)

ZONE_LABEL = "topology.kubernetes.io/zone"
EXTERNAL_KINDS = ("NodePort", "ExternalIP", "LoadBalancer")


@dataclass(frozen=True, slots=True)
class FrontendState:
    """What one frontend should translate to."""

    service: ServicePort
    ready: tuple[Backend, ...]
    terminating: tuple[Backend, ...]  # serving and terminating: used only when none is ready
    kind: str = "ClusterIP"  # ClusterIP | NodePort | ExternalIP | LoadBalancer
    # externalTrafficPolicy Local: ready/terminating are this node's endpoints, the client address is kept,
    # and traffic from inside the cluster gets `in_cluster` instead (kube-proxy's short-circuit)
    local_external: bool = False
    in_cluster: Backends | None = None
    # endpoint addresses that may be pods of this node (their nodeName is this node's, or unset): the only
    # ones a connection through this node can be DNATed back to its own source from (hairpin); None: any
    here: tuple[str, ...] | None = None

    @property
    def external(self) -> bool:
        return self.kind in EXTERNAL_KINDS

    @property
    def serving(self) -> frozenset[Backend]:
        """Every backend this frontend may translate to now, for clients inside or outside the cluster."""
        in_cluster = self.in_cluster or ((), ())
        return frozenset((*self.ready, *self.terminating, *in_cluster[0], *in_cluster[1]))


class KeyChanges:
    """The service keys changed since their consumer last took them (kube-proxy's per-consumer change
    tracker): each consumer (a proxier, the DNS zone, the DNS fast path) has its own, filled by the model under
    its lock, and compares what it holds with the model's current state for just those keys. Bounded by the
    number of services. `since`: when the oldest key not yet taken arrived; `taken_since`: that of the batch
    last taken (where network programming latency starts)."""

    def __init__(self, lock: threading.Lock, wake: Callable[[], None] | None = None) -> None:
        self._lock = lock
        self.keys: set[ServiceKey] = set()
        self.wake = wake  # called (under the model's lock: keep it short) when the first key of a batch arrives
        self.since: float | None = None
        self.taken_since: float | None = None

    def add(self, key: ServiceKey) -> None:
        """(The model, under its lock.)"""
        if not self.keys:
            self._first()
        self.keys.add(key)

    def add_all(self, keys: set[ServiceKey]) -> None:
        """(The model, under its lock: every service changed.)"""
        if keys and not self.keys:
            self._first()
        self.keys |= keys

    def take(self) -> set[ServiceKey]:
        with self._lock:
            keys, self.keys = self.keys, set()
            self.taken_since, self.since = self.since, None
        return keys

    def take_all(self, keys: Callable[[], set[ServiceKey]]) -> set[ServiceKey]:
        """A full sync's batch: every key `keys()` gives (read under the model's lock) and what was pending.
        Only what was pending is a change (`since`): the rest neither wakes anyone nor counts as waiting."""
        with self._lock:
            self.keys |= keys()
        return self.take()

    def pending(self) -> int:
        return len(self.keys)

    def _first(self) -> None:
        self.since = time.monotonic()
        if self.wake is not None:
            try:
                self.wake()
            except RuntimeError:  # the consumer's loop has closed (noded stopping): nobody to wake
                self.wake = None


class ServiceModel:
    """Services and EndpointSlices by key, and the set of services changed since the last sync."""

    def __init__(self, node_name: str = "", node_ips: tuple[str, ...] = ()) -> None:
        self.node_name = node_name
        self.node_ips: tuple[str, ...] = tuple(node_ips)  # where NodePorts listen
        self.node_zone: str | None = None  # from this node's Node object
        self._lock = threading.Lock()
        self._services: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        self._vips: dict[tuple[str, int, str], ServiceKey] = {}
        self._vip_generation = -1
        self._slices: dict[ServiceKey, EndpointSlice] = {}
        # a service's slices: a tuple (one or a few; a set per service was 2.4 MiB at 10,000 services)
        self._slices_of: dict[ServiceKey, tuple[ServiceKey, ...]] = {}
        self._frontend_consumers: list[KeyChanges] = []  # each proxier's change tracker
        self._health_checked: set[ServiceKey] = set()  # services with a healthCheckNodePort to serve
        self._dns: dict[ServiceKey, DnsService] = {}  # every Service as DNS sees it (headless, ExternalName too)
        self.generation = 0  # bumped on every change to services or slices
        self.dns_generation = 0  # bumped on every change DNS can see (a Service, a headless Service's slices)
        self._dns_consumers: list[KeyChanges] = []
        self.service_changes = 0
        self.endpoint_changes = 0
        self.rejected_by_kind: dict[str, int] = {}  # objects rejected, by their kind
        self.node_eligible = True  # for load balancers (KEP-3836): False while this node is being deleted
        # cluster IP:port pairs this node answers itself (the cluster DNS addresses' port 53, which noded's DNS
        # serves): no proxier translates them, whatever Service names them
        self.served_locally: frozenset[tuple[str, int]] = frozenset()

    # -- input from sources -------------------------------------------------
    def upsert(self, obj: Any) -> bool:
        """Take a new or changed object; a malformed one is rejected alone (False), keeping what was there."""
        kind = obj.get("kind") if isinstance(obj, dict) else None
        try:
            if kind == "Service":
                ports_list, dns_view = parse_service_views(obj)
                ports = tuple(ports_list)  # kept as a tuple (a list is 16 bytes more per service)
                key = _key(obj)
                with self._lock:
                    if self._dns.get(key) != dns_view:
                        self._dns[key] = dns_view
                        self.generation += 1
                        self._dns_touch(key)
                    if self._services.get(key) != ports:
                        self._services[key] = ports
                        if any(p.health_check_node_port and p.external_traffic_local for p in ports):
                            self._health_checked.add(key)
                        else:
                            self._health_checked.discard(key)
                        self._touch(key)
                        self.service_changes += 1
            elif kind == "EndpointSlice":
                parsed = parse_endpoint_slice(obj)
                key = _key(obj)
                with self._lock:
                    self._set_slice(key, parsed)
            elif kind == "Node":
                meta = obj.get("metadata") or {}
                if meta.get("name") == self.node_name:
                    labels = meta.get("labels") or {}
                    self._set_zone(labels.get(ZONE_LABEL) or None)
                    self.node_eligible = node_eligible(obj)
        except ManifestError as e:
            with self._lock:
                kind = str(obj.get("kind")) if isinstance(obj, dict) else "?"
                self.rejected_by_kind[kind] = self.rejected_by_kind.get(kind, 0) + 1
            log.error("object rejected", object=object_ref(obj), error=str(e))
            return False
        return True

    def delete(self, kind: str, namespace: str, name: str) -> None:
        key = (namespace or "default", name)
        if kind == "Node" and name == self.node_name:
            self._set_zone(None)
            self.node_eligible = False  # deleted: load balancers should stop sending here
            return
        with self._lock:
            if kind == "Service" and self._dns.pop(key, None) is not None:
                self.generation += 1
                self._dns_touch(key)
            if kind == "Service" and self._services.pop(key, None) is not None:
                self._health_checked.discard(key)
                self._touch(key)
                self.service_changes += 1
            elif kind == "EndpointSlice":
                self._set_slice(key, None)

    def _set_slice(self, key: ServiceKey, parsed: EndpointSlice | None) -> None:
        old = self._slices.get(key)
        if old == parsed:
            return
        self.generation += 1
        for owner in {(s.namespace, s.service) for s in (old, parsed) if s is not None}:
            svc = self._dns.get(owner)
            if svc is not None and svc.headless:  # only a headless service's endpoints have names
                self._dns_touch(owner)
        if old is not None:
            owner = (old.namespace, old.service)
            left = tuple(k for k in self._slices_of.get(owner, ()) if k != key)
            if left:
                self._slices_of[owner] = left
            else:
                self._slices_of.pop(owner, None)
            self._touch((old.namespace, old.service))
            del self._slices[key]
        if parsed is not None:
            self._slices[key] = parsed
            owner = (parsed.namespace, parsed.service)
            held = self._slices_of.get(owner, ())
            if key not in held:
                self._slices_of[owner] = (*held, key)
            self._touch((parsed.namespace, parsed.service))
        self.endpoint_changes += 1

    def _set_zone(self, zone: str | None) -> None:
        if zone != self.node_zone:
            self.node_zone = zone
            self.mark_all_changed()

    def set_node_ips(self, ips: list[str] | tuple[str, ...]) -> bool:
        """The addresses NodePorts listen on; True (and every service marked changed) when they changed."""
        ips = tuple(sorted(set(ips)))
        if ips == self.node_ips:
            return False
        self.node_ips = ips
        self.mark_all_changed()
        return True

    def _dns_touch(self, key: ServiceKey) -> None:
        self.dns_generation += 1
        for consumer in self._dns_consumers:
            consumer.add(key)

    # -- output to the DNS zone and the fast path -------------------------------
    def dns_changes(self, wake: Callable[[], None] | None = None) -> KeyChanges:
        """A change tracker of its own for one DNS consumer: the services whose DNS view changed since it
        last took them; `wake` is called when a change arrives after the consumer took the last ones."""
        tracker = KeyChanges(self._lock, wake)
        with self._lock:
            self._dns_consumers.append(tracker)
        return tracker

    def dns_entry(self, key: ServiceKey) -> tuple[DnsService | None, list[EndpointSlice]]:
        """One service as DNS sees it (None: gone) and its slices."""
        with self._lock:
            return self._dns.get(key), [self._slices[s] for s in self._slices_of.get(key, ())]

    # -- output to the proxiers -------------------------------------------------
    def _touch(self, key: ServiceKey) -> None:
        for consumer in self._frontend_consumers:
            consumer.add(key)

    def frontend_changes(self, wake: Callable[[], None] | None = None) -> KeyChanges:
        """A change tracker of its own for one proxier: the services whose frontends may have changed since it
        last took them; `wake` is called when a change arrives after it took the last ones."""
        tracker = KeyChanges(self._lock, wake)
        with self._lock:
            self._frontend_consumers.append(tracker)
        return tracker

    def service_keys(self) -> set[ServiceKey]:
        """Every service with frontends or endpoints (a proxier's full sync); call under the model's lock."""
        return set(self._services) | {k for k, v in self._slices_of.items() if v}

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_kind.values())

    def no_local_endpoints(self) -> dict[tuple[str, str], int]:
        """(traffic policy, IP family) -> service ports with that policy Local and no serving endpoint on this
        node (kube-proxy's kubeproxy_sync_proxy_rules_no_local_endpoints_total)."""
        with self._lock:
            local = [
                (key, sp)
                for key, sps in self._services.items()
                for sp in sps
                if sp.internal_traffic_local or sp.external_traffic_local
            ]
            slices = {key: [self._slices[k] for k in self._slices_of.get(key, ())] for key, _sp in local}
        out: dict[tuple[str, str], int] = {}
        for key, sp in local:
            for family in sorted({_family(ip) for ip in sp.cluster_ips}):
                eps = _endpoints(sp, [s for s in slices[key] if s.address_type == family])
                if any(ep.node_name == self.node_name and (ep.ready or ep.serving) for _b, ep in eps):
                    continue
                for policy, on in (("internal", sp.internal_traffic_local), ("external", sp.external_traffic_local)):
                    if on:
                        out[(policy, family)] = out.get((policy, family), 0) + 1
        return out

    def set_served_locally(self, pairs: frozenset[tuple[str, int]]) -> bool:
        """Change the cluster IP:port pairs the node answers itself; True (every service to sync) when changed."""
        if pairs == self.served_locally:
            return False
        self.served_locally = pairs
        self.mark_all_changed()
        return True

    def mark_all_changed(self) -> None:
        """Every service changed for every proxier (the node's addresses or zone, the pairs served locally)."""
        with self._lock:
            keys = self.service_keys()
            for consumer in self._frontend_consumers:
                consumer.add_all(keys)

    def cluster_ips(self, namespace: str, name: str) -> tuple[str, ...]:
        """The ClusterIPs of one service (empty: no such service, or headless)."""
        with self._lock:
            ports = self._services.get((namespace, name))
            return ports[0].cluster_ips if ports else ()

    def dns_snapshot(self) -> tuple[int, dict[ServiceKey, DnsService], dict[ServiceKey, list[EndpointSlice]]]:
        """(DNS generation, every service, each headless service's slices): what the DNS zone indexes."""
        with self._lock:
            headless = [k for k, svc in self._dns.items() if svc.headless]
            slices = {k: [self._slices[s] for s in self._slices_of.get(k, ())] for k in headless}
            return self.dns_generation, dict(self._dns), slices

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._services), len(self._slices)

    def frontends_of(self, key: ServiceKey) -> dict[Frontend, FrontendState]:
        """The desired frontends of one service: cluster IPs, external IPs, LB IPs and node ports."""
        with self._lock:
            ports = list(self._services.get(key, []))
            slices = [self._slices[k] for k in self._slices_of.get(key, ())]
        out: dict[Frontend, FrontendState] = {}
        for sp in ports:
            for family in {_family(ip) for ip in sp.cluster_ips}:
                eps = _endpoints(sp, [s for s in slices if s.address_type == family])
                here = tuple(dict.fromkeys(b[0] for b, ep in eps if self._maybe_here(ep)))
                cluster = _pick(eps, _topology_filter(eps, self.node_zone))
                local = cluster  # only a Local policy looks at which endpoints are on this node
                if sp.internal_traffic_local or sp.external_traffic_local:
                    local = _pick(eps, lambda ep: ep.node_name == self.node_name)
                internal = local if sp.internal_traffic_local else cluster
                external = local if sp.external_traffic_local else cluster
                in_cluster = internal if sp.external_traffic_local else None
                proto = sp.name.protocol
                for ip, port, kind in self._addresses(sp):
                    if _family(ip) != family:
                        continue
                    if kind == "ClusterIP":
                        out[Frontend(ip, port, proto)] = FrontendState(sp, *internal, here=here)
                    else:
                        out[Frontend(ip, port, proto)] = FrontendState(
                            sp,
                            *external,
                            kind=kind,
                            local_external=sp.external_traffic_local,
                            in_cluster=in_cluster,
                            here=here,
                        )
        return out

    def _maybe_here(self, ep: Endpoint) -> bool:
        """Whether an endpoint may be a pod of this node: its nodeName says so, or it has none (an endpoint
        written by hand), or this node's name is not known."""
        return not ep.node_name or not self.node_name or ep.node_name == self.node_name

    def _addresses(self, sp: ServicePort) -> list[tuple[str, int, str]]:
        """Where one service port is reached, (address, port, kind): its cluster IPs (those this node does not
        answer itself), external IPs, load-balancer IPs and node ports."""
        out = [(ip, sp.port, "ClusterIP") for ip in sp.cluster_ips if (ip, sp.port) not in self.served_locally]
        out += [(ip, sp.port, "ExternalIP") for ip in sp.external_ips]
        if sp.type == "LoadBalancer":
            out += [(ip, sp.port, "LoadBalancer") for ip in sp.load_balancer_ips]
        if sp.node_port and sp.type in ("NodePort", "LoadBalancer"):
            out += [(ip, sp.node_port, "NodePort") for ip in self.node_ips]
        return out

    def frontend_names(self) -> dict[str, str]:
        """Every frontend this node may program -> the service port behind it (`noded services`), cheaply:
        from the services alone, no endpoint selection."""
        with self._lock:
            ports = [sp for sps in self._services.values() for sp in sps]
        return {
            str(Frontend(ip, port, sp.name.protocol)): str(sp.name)
            for sp in ports
            for ip, port, _kind in self._addresses(sp)
        }

    def cluster_frontend(self, ip: str, port: int, protocol: str = "TCP") -> FrontendState | None:
        """What a cluster IP frontend translates to (the tunnel resolves VIPs itself), or None."""
        with self._lock:
            key = self._vip_owner(ip, port, protocol)
        return self.frontends_of(key).get(Frontend(ip, port, protocol)) if key else None

    def cluster_port(self, ip: str, port: int, protocol: str = "TCP") -> ServicePort | None:
        """The Service port behind a cluster IP frontend, without choosing its endpoints, or None."""
        with self._lock:
            key = self._vip_owner(ip, port, protocol)
            ports = self._services.get(key, ()) if key else ()
            return next((sp for sp in ports if sp.port == port and sp.name.protocol == protocol), None)

    def _vip_owner(self, ip: str, port: int, protocol: str) -> ServiceKey | None:
        """The service owning a cluster IP frontend (the index rebuilt after a change); under the lock."""
        if self._vip_generation != self.generation:
            self._vips = {
                (vip, sp.port, sp.name.protocol): key
                for key, ports in self._services.items()
                for sp in ports
                for vip in sp.cluster_ips
            }
            self._vip_generation = self.generation
        return self._vips.get((ip, port, protocol))

    def health_checks(self) -> dict[int, tuple[str, int]]:
        """kube-proxy's service health checks: healthCheckNodePort -> (namespace/name, local ready endpoints)."""
        with self._lock:
            services = {k: list(self._services[k]) for k in self._health_checked}
            slices_of = {k: [self._slices[s] for s in self._slices_of.get(k, ())] for k in services}
        out: dict[int, tuple[str, int]] = {}
        for key, ports in services.items():
            sp = next((p for p in ports if p.health_check_node_port and p.external_traffic_local), None)
            if sp is None or sp.type not in ("LoadBalancer", "NodePort"):
                continue
            # local endpoints per family: a dual-stack pod is one endpoint, with an address in each
            local: dict[str, set[str]] = {}
            for s in slices_of.get(key, []):
                for ep in s.endpoints:
                    if ep.ready and ep.node_name == self.node_name:
                        local.setdefault(s.address_type, set()).add(ep.address)
            out[sp.health_check_node_port] = (f"{key[0]}/{key[1]}", max(map(len, local.values()), default=0))
        return out


TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def node_eligible(node: dict) -> bool:
    """Whether load balancers should send to this node (kube-proxy's /healthz, KEP-3836): not while it is
    being deleted, nor while the cluster autoscaler has tainted it for deletion."""
    meta = node.get("metadata") if isinstance(node.get("metadata"), dict) else {}
    if meta.get("deletionTimestamp"):
        return False
    spec = node.get("spec") if isinstance(node.get("spec"), dict) else {}
    taints = spec.get("taints") if isinstance(spec.get("taints"), list) else []
    return not any(isinstance(t, dict) and t.get("key") == TO_BE_DELETED_TAINT for t in taints)


def _family(ip: str) -> str:
    """IPv4 or IPv6 of an address the parser normalised (no parse: this runs for every frontend)."""
    return "IPv6" if ":" in ip else "IPv4"


def _endpoints(sp: ServicePort, slices: list[EndpointSlice]) -> list[tuple[Backend, Endpoint]]:
    """Every endpoint of one service port, with the backend (address, target port) it stands for."""
    out: dict[Backend, Endpoint] = {}
    for s in slices:
        target = next((p for n, proto, p in s.ports if n == sp.name.port and proto == sp.name.protocol), None)
        if target is None:
            continue
        for ep in s.endpoints:
            backend = (ep.address, target)
            if backend not in out or ep.ready:
                out[backend] = ep
    return sorted(out.items())


def _topology_filter(eps: list[tuple[Backend, Endpoint]], zone: str | None) -> Callable[[Endpoint], bool] | None:
    """kube-proxy's zone-hint rule: use hints only when the node has a zone, every ready endpoint carries
    hints, and at least one is hinted for this zone; otherwise every endpoint (None: no filter)."""
    if not zone:
        return None
    ready = [ep for _b, ep in eps if ep.ready]
    if ready and all(ep.zone_hints for ep in ready) and any(zone in ep.zone_hints for ep in ready):
        return lambda ep: zone in ep.zone_hints
    return None


def _pick(eps: list[tuple[Backend, Endpoint]], keep: Callable[[Endpoint], bool] | None) -> Backends:
    """Ready backends among those kept (all: keep None), and the serving-terminating fallback (kube-proxy's
    rules)."""
    kept = eps if keep is None else [(b, ep) for b, ep in eps if keep(ep)]
    ready = tuple(b for b, ep in kept if ep.ready)
    terminating = tuple(b for b, ep in kept if not ep.ready and ep.serving and ep.terminating)
    return ready, terminating


def _key(obj: dict) -> ServiceKey:
    meta = obj["metadata"]
    return (meta.get("namespace") or "default", meta["name"])
