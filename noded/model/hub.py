"""The hub every source feeds: one entry point for every kind noded reads, each kind routed to its owner.

Sources call `upsert(obj)`, `delete(kind, namespace, name)` and `synced(source)` (the Sink protocol,
noded/sources/base.py). The owners:

- Service, EndpointSlice, Node: the service model (tracker.py);
- Pod, Namespace: the pods' enrollment (pods.py);
- AuthorizationPolicy: the tunnel's Authorizer (in force failing closed when it does not parse);
- Gateway, HTTPRoute, and the use-waypoint labels and appProtocols of Services and Namespaces: the waypoint
  Registry.

Each owner tells its own consumers what changed (the model's change trackers, one per proxier and per DNS
consumer; enrollment's watchers): nothing here knows who they are, and nothing polls. What the hub keeps
itself: which sources have synced, and the objects rejected (by kind, the newest 50 with why). Whatever an
object holds, it is rejected alone: an owner that raises (a bug) rejects that object, logged and counted, and
never reaches the source, whose watch would otherwise retry the same event forever and never sync.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from noded.model.pods import Enrollment
from noded.model.tracker import ServiceModel

log = structlog.get_logger("noded.model.hub")
LAST_REJECTED = 50


@dataclass(frozen=True, slots=True)
class Route:
    """One owner of a kind: how it takes an object, how it lets one go, and why it refused one."""

    upsert: Callable[[dict], bool | None]
    delete: Callable[[str, str, str], None]
    decides: bool = True  # its verdict is the object's (else it only reads labels off it)
    why: Callable[[dict], str] | None = None  # why it refused (its rejection is logged and counted here)


class Hub:
    def __init__(self, model: ServiceModel, enrollment: Enrollment, policies=None, waypoints=None) -> None:
        from noded.tunnel.policy import Authorizer
        from noded.waypoint.registry import Registry

        self.model = model
        self.enrollment = enrollment
        self.policies = policies or Authorizer()
        self.waypoints = waypoints or Registry()  # Gateways, use-waypoint labels, appProtocols, HTTPRoutes
        self.synced_sources: set[str] = set()
        self.all_synced = threading.Event()
        self.expected: set[str] = set()
        self.rejected_by_kind: collections.Counter[str] = collections.Counter()  # refusals and owners' bugs
        self.last_rejected: dict[str, str] = {}  # "Kind ns/name" -> why, the newest LAST_REJECTED
        services = Route(model.upsert, model.delete)
        labels = Route(self.waypoints.upsert, self.waypoints.delete, decides=False)
        pods = Route(enrollment.upsert, enrollment.delete)
        waypoint = Route(self.waypoints.upsert, self.waypoints.delete, why=self._waypoint_why)
        policy = Route(self.policies.upsert, lambda _k, ns, name: self.policies.delete(ns, name), why=self._policy_why)
        self.routes: dict[str, tuple[Route, ...]] = {
            "Service": (labels, services),
            "EndpointSlice": (services,),
            "Node": (services,),
            "Pod": (pods,),
            "Namespace": (labels, pods),
            "AuthorizationPolicy": (policy,),
            "Gateway": (waypoint,),
            "HTTPRoute": (waypoint,),
        }
        self._other = services  # any other kind (or no object at all): the model rejects it, saying why

    def upsert(self, obj: dict) -> bool:
        """Hand an object to its owners; whether it was taken."""
        try:
            kind = obj.get("kind") if isinstance(obj, dict) else None
            taken = True
            for route in self.routes.get(kind, (self._other,)) if isinstance(kind, str) else (self._other,):
                ok = route.upsert(obj)
                if route.decides and ok is not None and not ok:
                    taken = False
                    if route.why is not None:
                        self._rejected(obj, route.why(obj))
            return taken
        except Exception as e:
            self._rejected(obj, f"{type(e).__name__}: {e}")
            return False

    def delete(self, kind: str, namespace: str, name: str) -> None:
        for route in self.routes.get(kind, (self._other,)):
            route.delete(kind, namespace, name)

    def synced(self, source: str) -> None:
        self.synced_sources.add(source)
        log.info("source synced", source=source)
        if self.expected <= self.synced_sources:
            self.all_synced.set()

    # -- rejections ---------------------------------------------------------------------------------
    def _rejected(self, obj: object, error: str) -> None:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        kind = str(obj.get("kind")) if isinstance(obj, dict) else type(obj).__name__
        self.rejected_by_kind[kind] += 1
        name = f"{kind} {meta.get('namespace') or ''}/{meta.get('name')}"
        self.last_rejected[name] = error[:300]
        while len(self.last_rejected) > LAST_REJECTED:  # bounded: the newest
            self.last_rejected.pop(next(iter(self.last_rejected)))
        log.error("object rejected", object=name, error=error[:300])

    def _waypoint_why(self, obj: dict) -> str:
        return self.waypoints.status()["rejected"].get(_named(obj), "not a waypoint object")

    def _policy_why(self, obj: dict) -> str:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        return f"{self.policies.rejected.get(key)}; in force failing closed"


def _named(obj: dict) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return f"{obj.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name')}"
