"""Which Services go through a waypoint, and with what protocol and routes. Pure, thread-safe.

As `istioctl waypoint apply [--enroll-namespace]` writes it: a Gateway with `gatewayClassName:
istio-waypoint` in a namespace is a waypoint; the label `istio.io/use-waypoint: <gateway name>` on a
Service, else on its Namespace, sends the Service's traffic through it; `none` on the Service opts it out.
A label naming a Gateway that does not exist (or is not a waypoint) leaves the Service on the L4 path, and
`status()` says why (istiod reports it the same way, as the WaypointBound condition). A waypoint serves
Services of its own namespace (`istio.io/use-waypoint-namespace` is not supported and is reported).

Protocol, Istio's way: the port's `appProtocol` (http, http2, grpc, h2c, kubernetes.io/h2c, ...), else its
name's prefix (`http`, `http2`, `grpc`, `grpc-web`, followed by nothing or `-`), else TCP. HTTPRoutes attached
to a Service are kept by (namespace, name); a malformed one is rejected alone with a readable message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from noded.waypoint.routes import HTTPRoute, RouteError, parse_route, route_order

USE_LABEL = "istio.io/use-waypoint"
USE_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
CLASS = "istio-waypoint"
HTTP, HTTP2, TCP = "HTTP", "HTTP2", "TCP"
_APP_PROTOCOLS = {
    "http": HTTP,
    "http2": HTTP2,
    "grpc": HTTP2,
    "grpc-web": HTTP,
    "h2c": HTTP2,
    "kubernetes.io/h2c": HTTP2,
    "kubernetes.io/ws": HTTP,
    "kubernetes.io/wss": TCP,
    "https": TCP,
    "tls": TCP,
    "tcp": TCP,
}
_NAME_PREFIXES = (("http2", HTTP2), ("grpc-web", HTTP), ("grpc", HTTP2), ("http", HTTP))
MAX_ROUTES_PER_SERVICE = 64


def protocol(app_protocol: str | None, port_name: str) -> str:
    """HTTP, HTTP2 or TCP for a Service port, as Istio selects it."""
    if app_protocol:
        return _APP_PROTOCOLS.get(app_protocol.lower(), TCP)
    name = port_name.lower()
    for prefix, proto in _NAME_PREFIXES:
        if name == prefix or name.startswith(prefix + "-"):
            return proto
    return TCP


@dataclass(frozen=True)
class Waypoint:
    namespace: str
    name: str

    def identity(self, trust_domain: str) -> str:
        """The waypoint's SPIFFE ID: its Gateway's name is its service account, as Istio deploys it."""
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.name}"


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gateways: dict[tuple[str, str], str] = {}  # (ns, name) -> gatewayClassName
        self.namespace_labels: dict[str, str] = {}  # ns -> use-waypoint value
        self.service_labels: dict[tuple[str, str], str] = {}  # (ns, svc) -> use-waypoint value
        self.cross_namespace: dict[tuple[str, str], str] = {}  # what asked for another namespace's waypoint
        self.app_protocols: dict[tuple[str, str], dict[int, str]] = {}  # (ns, svc) -> {port: appProtocol}
        self.routes: dict[tuple[str, str], HTTPRoute] = {}
        self.rejected: dict[str, str] = {}  # "Kind ns/name" -> why
        self.generation = 0
        self._routes_for: dict[tuple[str, str, int], list[HTTPRoute]] = {}
        self._routes_generation = -1

    # -- objects in -------------------------------------------------------------------------------
    def upsert(self, obj: dict) -> bool | None:
        """Take what the waypoint needs from an object; None when the kind is not the registry's alone
        (Service, Namespace: their other owners take them too); False when rejected."""
        kind = obj.get("kind")
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        namespace = (
            meta.get("namespace") if isinstance(meta.get("namespace"), str) and meta.get("namespace") else "default"
        )
        labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
        with self._lock:
            self.generation += 1
            if kind == "Namespace":
                self._label(self.namespace_labels, name, labels, ("Namespace", "", name))
                return None
            if kind == "Service":
                self._service(namespace, name, labels, obj.get("spec"))
                return None
            if kind == "Gateway":
                spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
                self.gateways[(namespace, name)] = str(spec.get("gatewayClassName") or "")
                return True
            if kind == "HTTPRoute":
                key = f"HTTPRoute {namespace}/{name}"
                self.routes.pop((namespace, name), None)
                try:
                    route = parse_route(obj)
                except RouteError as e:
                    self.rejected[key] = str(e)
                    return False
                except Exception as e:  # a parser bug: this route alone is rejected
                    self.rejected[key] = f"{type(e).__name__}: {e}"
                    return False
                self.rejected.pop(key, None)
                self.routes[(namespace, name)] = route
                return True
        return None

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self.generation += 1
            if kind == "Namespace":
                self.namespace_labels.pop(name, None)
            elif kind == "Service":
                self._service(namespace, name, {}, None)
            elif kind == "Gateway":
                self.gateways.pop((namespace, name), None)
            elif kind == "HTTPRoute":
                self.routes.pop((namespace, name), None)
                self.rejected.pop(f"HTTPRoute {namespace}/{name}", None)

    def _label(self, into: dict, key: object, labels: dict, owner: tuple[str, str, str]) -> None:
        value = labels.get(USE_LABEL)
        if isinstance(value, str) and value:
            into[key] = value
        else:
            into.pop(key, None)
        other = labels.get(USE_NAMESPACE_LABEL)
        if isinstance(other, str) and other and other != (owner[1] or owner[2]):
            self.cross_namespace[owner[1:]] = other
        else:
            self.cross_namespace.pop(owner[1:], None)

    def _service(self, namespace: str, name: str, labels: dict, spec: object) -> None:
        self._label(self.service_labels, (namespace, name), labels, ("Service", namespace, name))
        ports = spec.get("ports") if isinstance(spec, dict) and isinstance(spec.get("ports"), list) else []
        apps = {
            p["port"]: p["appProtocol"]
            for p in ports
            if isinstance(p, dict) and isinstance(p.get("port"), int) and isinstance(p.get("appProtocol"), str)
        }
        if apps:
            self.app_protocols[(namespace, name)] = apps
        else:
            self.app_protocols.pop((namespace, name), None)

    # -- questions --------------------------------------------------------------------------------
    def waypoint_of(self, namespace: str, service: str) -> Waypoint | None:
        """The waypoint a Service's traffic goes through, or None (L4 only)."""
        with self._lock:
            value = self.service_labels.get((namespace, service))
            if value is None:
                value = self.namespace_labels.get(namespace)
            if value is None or value == "none":
                return None
            if (namespace, service) in self.cross_namespace or ("", namespace) in self.cross_namespace:
                return None  # another namespace's waypoint: not supported, left on L4 (see status)
            if self.gateways.get((namespace, value)) != CLASS:
                return None
            return Waypoint(namespace, value)

    def protocol_of(self, namespace: str, service: str, port: int, port_name: str) -> str:
        with self._lock:
            app = self.app_protocols.get((namespace, service), {}).get(port)
        return protocol(app, port_name)

    def routes_for(self, namespace: str, service: str, port: int) -> list[HTTPRoute]:
        """The HTTPRoutes attached to this Service port (a parentRef with no port: every port), oldest first
        (routes.choose's tie order); kept per generation."""
        key = (namespace, service, port)
        with self._lock:
            if self._routes_generation != self.generation or len(self._routes_for) > 4096:
                self._routes_for.clear()
                self._routes_generation = self.generation
            found = self._routes_for.get(key)
            if found is None:
                found = [
                    r
                    for r in self.routes.values()
                    if any(p[:2] == (namespace, service) and p[2] in (None, port) for p in r.parents)
                ]
                found = self._routes_for[key] = sorted(found, key=route_order)[:MAX_ROUTES_PER_SERVICE]
        return found

    def waypoints(self) -> list[Waypoint]:
        with self._lock:
            return [Waypoint(ns, name) for (ns, name), cls in sorted(self.gateways.items()) if cls == CLASS]

    def status(self) -> dict:
        with self._lock:
            unbound = {}
            for (ns, svc), value in self.service_labels.items():
                if value != "none" and self.gateways.get((ns, value)) != CLASS:
                    unbound[f"Service {ns}/{svc}"] = (
                        f"{USE_LABEL}={value}: no Gateway of class {CLASS} named so in {ns}"
                    )
            for ns, value in self.namespace_labels.items():
                if value != "none" and self.gateways.get((ns, value)) != CLASS:
                    unbound[f"Namespace {ns}"] = f"{USE_LABEL}={value}: no Gateway of class {CLASS} named so in {ns}"
            for (ns, name), other in self.cross_namespace.items():
                where = f"Service {ns}/{name}" if ns else f"Namespace {name}"
                unbound[where] = f"{USE_NAMESPACE_LABEL}={other}: a waypoint of another namespace is not supported"
            return {
                "waypoints": [f"{ns}/{name}" for (ns, name), cls in sorted(self.gateways.items()) if cls == CLASS],
                "routes": sorted(f"{ns}/{name}" for ns, name in self.routes),
                "rejected": dict(self.rejected),
                "unbound": unbound,
            }
