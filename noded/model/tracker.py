"""The change-tracked service model: what sources told us, which services changed, and their desired frontends.

Sources call upsert/delete with plain objects; the sync runner calls
take_changes() and frontends_of() for just the services that changed. Pure:
no kernel, no I/O but a log line for a rejected object.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import structlog

from noded.model.objects import (
    EndpointSlice,
    ManifestError,
    ServicePort,
    object_ref,
    parse_endpoint_slice,
    parse_service,
)

log = structlog.get_logger("noded.model")

ServiceKey = tuple[str, str]  # (namespace, name)
Backend = tuple[str, int]  # (address, port)


@dataclass(frozen=True)
class Frontend:
    ip: str
    port: int
    protocol: str

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class FrontendState:
    """What one frontend should translate to."""

    service: ServicePort
    ready: tuple[Backend, ...]
    terminating: tuple[Backend, ...]  # serving and terminating: used only when none is ready


class ServiceModel:
    """Services and EndpointSlices by key, and the set of services changed since the last sync."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[ServiceKey, list[ServicePort]] = {}
        self._slices: dict[ServiceKey, EndpointSlice] = {}
        self._slices_of: dict[ServiceKey, set[ServiceKey]] = defaultdict(set)
        self._dirty: set[ServiceKey] = set()
        self.service_changes = 0
        self.endpoint_changes = 0
        self.rejected = 0

    # -- input from sources -------------------------------------------------
    def upsert(self, obj: Any) -> bool:
        """Take a new or changed object; a malformed one is rejected alone (False), keeping what was there."""
        kind = obj.get("kind") if isinstance(obj, dict) else None
        try:
            if kind == "Service":
                ports = parse_service(obj)
                key = _key(obj)
                with self._lock:
                    if self._services.get(key) != ports:
                        self._services[key] = ports
                        self._dirty.add(key)
                        self.service_changes += 1
            elif kind == "EndpointSlice":
                parsed = parse_endpoint_slice(obj)
                key = _key(obj)
                with self._lock:
                    self._set_slice(key, parsed)
        except ManifestError as e:
            with self._lock:
                self.rejected += 1
            log.error("object rejected", object=object_ref(obj), error=str(e))
            return False
        return True

    def delete(self, kind: str, namespace: str, name: str) -> None:
        key = (namespace or "default", name)
        with self._lock:
            if kind == "Service" and self._services.pop(key, None) is not None:
                self._dirty.add(key)
                self.service_changes += 1
            elif kind == "EndpointSlice":
                self._set_slice(key, None)

    def _set_slice(self, key: ServiceKey, parsed: EndpointSlice | None) -> None:
        old = self._slices.get(key)
        if old == parsed:
            return
        if old is not None:
            self._slices_of[(old.namespace, old.service)].discard(key)
            self._dirty.add((old.namespace, old.service))
            del self._slices[key]
        if parsed is not None:
            self._slices[key] = parsed
            self._slices_of[(parsed.namespace, parsed.service)].add(key)
            self._dirty.add((parsed.namespace, parsed.service))
        self.endpoint_changes += 1

    # -- output to the sync runner -------------------------------------------
    def take_changes(self) -> set[ServiceKey]:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        return dirty

    def mark_all_changed(self) -> None:
        with self._lock:
            self._dirty |= set(self._services) | {k for k, v in self._slices_of.items() if v}

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._services), len(self._slices)

    def frontends_of(self, key: ServiceKey) -> dict[Frontend, FrontendState]:
        """The desired frontends of one service (empty when it is gone or has no cluster IP)."""
        with self._lock:
            ports = list(self._services.get(key, []))
            slices = [self._slices[k] for k in self._slices_of.get(key, ())]
        out: dict[Frontend, FrontendState] = {}
        for sp in ports:
            for ip in sp.cluster_ips:
                family = f"IPv{ipaddress.ip_address(ip).version}"
                ready, terminating = _backends(sp, [s for s in slices if s.address_type == family])
                out[Frontend(ip, sp.port, sp.name.protocol)] = FrontendState(sp, ready, terminating)
        return out


def _backends(sp: ServicePort, slices: list[EndpointSlice]) -> tuple[tuple[Backend, ...], tuple[Backend, ...]]:
    """Ready backends, and the serving-terminating fallback, for one service port (kube-proxy's rules)."""
    ready: set[Backend] = set()
    terminating: set[Backend] = set()
    for s in slices:
        target = next((p for n, proto, p in s.ports if n == sp.name.port and proto == sp.name.protocol), None)
        if target is None:
            continue
        for ep in s.endpoints:
            backend = (ep.address, target)
            if ep.ready:
                ready.add(backend)
            elif ep.serving and ep.terminating:
                terminating.add(backend)
    terminating -= ready
    return tuple(sorted(ready)), tuple(sorted(terminating))


def _key(obj: dict) -> ServiceKey:
    meta = obj["metadata"]
    return (meta.get("namespace") or "default", meta["name"])
