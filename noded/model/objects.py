"""Parses Service and EndpointSlice objects (plain dicts, from YAML or the API) into typed, validated values.

One parser for every source. A malformed object raises ManifestError naming the
object and the field; nothing here has side effects.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_AFFINITY_TIMEOUT = 10800  # kube-proxy's default for ClientIP
MAX_AFFINITY_TIMEOUT = 86400


class ManifestError(ValueError):
    """A malformed object; the message names it and the field at fault."""


@dataclass(frozen=True, slots=True)
class ServicePortName:
    namespace: str
    name: str
    port: str  # the port's name ("" when unnamed)
    protocol: str

    def __str__(self) -> str:
        suffix = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{suffix}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: ServicePortName
    cluster_ips: tuple[str, ...]
    port: int
    node_port: int
    type: str
    affinity_timeout: int  # seconds; 0 when sessionAffinity is None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    external_traffic_local: bool = False
    internal_traffic_local: bool = False
    health_check_node_port: int = 0
    prefer_close: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()
    hostname: str | None = None  # DNS: <hostname>.<service>.<ns>.svc for headless services


@dataclass(frozen=True, slots=True)
class DnsService:
    """What the cluster DNS zone needs of a Service, headless and ExternalName ones included."""

    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]  # empty for headless and ExternalName
    headless: bool
    external_name: str
    ports: tuple[tuple[str, str, int], ...]  # (name, protocol, port)
    publish_not_ready: bool


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str
    address_type: str  # IPv4 | IPv6 | FQDN
    ports: tuple[tuple[str, str, int], ...]  # (name, protocol, port)
    endpoints: tuple[Endpoint, ...]


def object_ref(obj: Any) -> str:
    """A readable name for an object, however broken it is."""
    if not isinstance(obj, dict):
        return f"<{type(obj).__name__}>"
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    ns = meta.get("namespace") or "default"
    return f"{obj.get('kind', '?')} {ns}/{meta.get('name', '?')}"


def _get(d: dict, key: str, typ: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    value = d.get(key, default)
    if value is None:
        return default
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ManifestError(f"{where}.{key}: expected {_type_name(typ)}, got {value!r}")
    return value


def _type_name(typ: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a boolean"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _port(value: Any, where: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if allow_zero else 1) <= value <= 65535:
        raise ManifestError(f"{where}: {value!r} is not a port number")
    return value


_SHAPES: dict[tuple, tuple] = {}  # port lists many Services share, kept once
_SHAPES_MAX = 4096


def _shared(ports: tuple) -> tuple:
    """One tuple for every Service with the same ports (most clusters have a few dozen shapes), bounded."""
    known = _SHAPES.get(ports)
    if known is not None:
        return known
    if len(_SHAPES) < _SHAPES_MAX:
        _SHAPES[ports] = ports
    return ports


def _ip(value: Any, where: str) -> str:
    """The address in its canonical text. A dotted quad already canonical (nearly every one) is checked by
    inet_pton/inet_ntop and kept as given: ipaddress's parser was half of a 10,000-service start."""
    if not isinstance(value, str):  # ipaddress would take the number 5 as 0.0.0.5
        raise ManifestError(f"{where}: {value!r} is not an IP address")
    if "." in value and ":" not in value:
        try:
            if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value)) == value:
                return value
        except OSError:
            pass  # ipaddress decides, and says why
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise ManifestError(f"{where}: {value!r} is not an IP address") from None


# The API server's name rules (apimachinery's validation): names reach chain names, rule comments and
# logs, so nothing else ever gets that far (a port name carrying a newline once made a `flush ruleset`).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
NAME_RULES = {  # kind -> (pattern, max length, what the API server calls it)
    "Service": (_DNS1035_LABEL, 63, "a DNS-1035 label"),
    "EndpointSlice": (_DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain"),
    "Node": (_DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain"),
}


NODE_NAMES_KEPT = 65536  # valid node names remembered (bounded: names are input)
_NODE_NAMES: dict[str, str] = {}  # a valid node name -> its interned self


def _name_ok(value: str, pattern: re.Pattern, limit: int) -> bool:
    return len(value) <= limit and pattern.fullmatch(value) is not None


def check_name(value: str, pattern: re.Pattern, limit: int, what: str, where: str) -> str:
    if not _name_ok(value, pattern, limit):
        raise ManifestError(f"{where}: {value[:80]!r} is not {what}")
    return value


def _metadata(obj: Any, kind: str) -> tuple[str, str, dict]:
    if not isinstance(obj, dict):
        raise ManifestError(f"{kind}: expected an object, got {type(obj).__name__}")
    meta = _get(obj, "metadata", dict, kind, {})
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{kind}: metadata.name is missing")
    pattern, limit, what = NAME_RULES.get(kind, (_DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain"))
    check_name(name, pattern, limit, what, f"{kind}: metadata.name")
    namespace = _get(meta, "namespace", str, f"{kind} {name}.metadata", "default")
    check_name(namespace, _DNS1123_LABEL, 63, "a DNS-1123 label", f"{kind} {name}: metadata.namespace")
    return sys.intern(namespace), name, meta


# kube-proxy's label selector: objects with these labels are not its to proxy (another proxy owns the
# service: service-proxy-name; or the endpoints controller marked them headless)
NOT_PROXIED_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")


def _not_proxied(meta: dict, where: str) -> bool:
    labels = _get(meta, "labels", dict, where, {}) or {}
    return any(label in labels for label in NOT_PROXIED_LABELS)


def parse_service(obj: Any) -> list[ServicePort]:
    """The service ports a Service defines (none for headless and ExternalName services)."""
    return parse_service_views(obj)[0]


def parse_service_views(obj: Any) -> tuple[list[ServicePort], DnsService]:
    """One validating pass over a Service: its service ports (for the proxiers) and its DNS view."""
    namespace, name, meta = _metadata(obj, "Service")
    where = f"Service {namespace}/{name}: spec"
    spec = _get(obj, "spec", dict, f"Service {namespace}/{name}", {})
    svc_type = _get(spec, "type", str, where, "ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ManifestError(f"{where}.type: {svc_type!r} is not ClusterIP, NodePort, LoadBalancer or ExternalName")
    cluster_ips = list(_get(spec, "clusterIPs", list, where, []))
    single = _get(spec, "clusterIP", str, where)
    if single and not cluster_ips:
        cluster_ips = [single]
    if single and cluster_ips and single != cluster_ips[0] and single != "None":
        raise ManifestError(f"{where}.clusterIP: {single!r} differs from clusterIPs[0] {cluster_ips[0]!r}")
    headless = cluster_ips[:1] == ["None"]
    ips: list[str] = []
    if not headless:
        ips = [_ip(ip, f"{where}.clusterIPs[{i}]") for i, ip in enumerate(cluster_ips)]
        if len({":" in ip for ip in ips}) != len(ips):  # canonical text: IPv6 has a colon, IPv4 none
            raise ManifestError(f"{where}.clusterIPs: at most one address per IP family")
    external_ips = tuple(
        _ip(ip, f"{where}.externalIPs[{i}]") for i, ip in enumerate(_get(spec, "externalIPs", list, where, []))
    )
    status = _get(obj, "status", dict, f"Service {namespace}/{name}", {})
    lb = _get(status, "loadBalancer", dict, f"Service {namespace}/{name}: status", {})
    lb_ips = tuple(
        _ip(ing.get("ip"), f"Service {namespace}/{name}: status.loadBalancer.ingress[{i}].ip")
        for i, ing in enumerate(_get(lb, "ingress", list, "status.loadBalancer", []))
        if isinstance(ing, dict) and ing.get("ip")
    )
    affinity = _get(spec, "sessionAffinity", str, where, "None")
    if affinity not in ("None", "ClientIP"):
        raise ManifestError(f"{where}.sessionAffinity: {affinity!r} is not None or ClientIP")
    timeout = 0
    if affinity == "ClientIP":
        cfg = _get(spec, "sessionAffinityConfig", dict, where, {})
        client = _get(cfg, "clientIP", dict, f"{where}.sessionAffinityConfig", {})
        timeout = _get(
            client, "timeoutSeconds", int, f"{where}.sessionAffinityConfig.clientIP", DEFAULT_AFFINITY_TIMEOUT
        )
        if not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
            raise ManifestError(
                f"{where}.sessionAffinityConfig.clientIP.timeoutSeconds: {timeout} is not in 1..{MAX_AFFINITY_TIMEOUT}"
            )
    ext_policy = _get(spec, "externalTrafficPolicy", str, where, "Cluster")
    int_policy = _get(spec, "internalTrafficPolicy", str, where, "Cluster")
    for key, value in (("externalTrafficPolicy", ext_policy), ("internalTrafficPolicy", int_policy)):
        if value not in ("Cluster", "Local"):
            raise ManifestError(f"{where}.{key}: {value!r} is not Cluster or Local")
    distribution = _get(spec, "trafficDistribution", str, where, "")
    hc_port = _get(spec, "healthCheckNodePort", int, where, 0)
    checked = _check_ports(_get(spec, "ports", list, where, []), where)
    external_name = _get(spec, "externalName", str, where, "") if svc_type == "ExternalName" else ""
    if svc_type == "ExternalName" and not external_name:
        raise ManifestError(f"{where}.externalName: required for type ExternalName")
    cluster_ip_tuple = tuple(ips)  # one tuple shared by the DNS view and every port
    svc_type = sys.intern(svc_type)
    dns_view = DnsService(
        namespace=namespace,
        name=name,
        type=svc_type,
        cluster_ips=() if svc_type == "ExternalName" else cluster_ip_tuple,
        headless=headless,
        external_name=external_name.rstrip("."),
        ports=_shared(tuple((pname, proto, port) for pname, proto, port, _np in checked)),
        publish_not_ready=bool(_get(spec, "publishNotReadyAddresses", bool, where, False)),
    )
    if svc_type == "ExternalName" or headless or _not_proxied(meta, f"Service {namespace}/{name}.metadata"):
        return [], dns_view
    ports = [
        ServicePort(
            name=ServicePortName(namespace, name, pname, proto),
            cluster_ips=cluster_ip_tuple,
            port=port,
            node_port=node_port,
            type=svc_type,
            affinity_timeout=timeout,
            external_ips=external_ips,
            load_balancer_ips=lb_ips,
            external_traffic_local=ext_policy == "Local",
            internal_traffic_local=int_policy == "Local",
            health_check_node_port=hc_port,
            prefer_close=distribution == "PreferClose",
        )
        for pname, proto, port, node_port in checked
    ]
    return ports, dns_view


def _check_ports(ports: list, where: str) -> list[tuple[str, str, int, int]]:
    out: list[tuple[str, str, int, int]] = []
    seen: set[tuple[str, str]] = set()
    for i, p in enumerate(ports):
        at = f"{where}.ports[{i}]"
        if not isinstance(p, dict):
            raise ManifestError(f"{at}: expected an object, got {p!r}")
        pname = _get(p, "name", str, at, "")
        if pname:
            check_name(pname, _DNS1123_LABEL, 63, "a DNS-1123 label", f"{at}.name")
        proto = _get(p, "protocol", str, at, "TCP")
        if proto not in PROTOCOLS:
            raise ManifestError(f"{at}.protocol: {proto!r} is not TCP, UDP or SCTP")
        if "port" not in p:
            raise ManifestError(f"{at}.port: missing")
        port = _port(p["port"], f"{at}.port")
        node_port = _port(p.get("nodePort", 0), f"{at}.nodePort", allow_zero=True)
        if len(ports) > 1 and not pname:
            raise ManifestError(f"{at}.name: required when a Service has more than one port")
        if (pname, proto) in seen:
            raise ManifestError(f"{at}.name: duplicate port {pname!r}/{proto}")
        seen.add((pname, proto))
        out.append((sys.intern(pname), sys.intern(proto), port, node_port))
    return out


def parse_endpoint_slice(obj: Any) -> EndpointSlice | None:
    """The slice's endpoints, or None for a slice that names no Service."""
    namespace, name, meta = _metadata(obj, "EndpointSlice")
    where = f"EndpointSlice {namespace}/{name}"
    labels = _get(meta, "labels", dict, f"{where}.metadata", {})
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        return None
    if not isinstance(service, str):
        raise ManifestError(f"{where}.metadata.labels.{SERVICE_NAME_LABEL}: expected a string")
    check_name(service, _DNS1035_LABEL, 63, "a Service name", f"{where}.metadata.labels.{SERVICE_NAME_LABEL}")
    address_type = _get(obj, "addressType", str, where)
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise ManifestError(f"{where}.addressType: {address_type!r} is not IPv4, IPv6 or FQDN")
    ports: list[tuple[str, str, int]] = []
    for i, p in enumerate(_get(obj, "ports", list, where, []) or []):
        at = f"{where}.ports[{i}]"
        if not isinstance(p, dict):
            raise ManifestError(f"{at}: expected an object, got {p!r}")
        proto = _get(p, "protocol", str, at, "TCP")
        if proto not in PROTOCOLS:
            raise ManifestError(f"{at}.protocol: {proto!r} is not TCP, UDP or SCTP")
        pname = _get(p, "name", str, at, "")
        if pname:
            check_name(pname, _DNS1123_LABEL, 63, "a DNS-1123 label", f"{at}.name")
        ports.append((sys.intern(pname), proto, _port(p.get("port"), f"{at}.port")))
    endpoints = tuple(
        _plain_endpoint(ep, address_type) or _parse_endpoint(ep, f"{where}.endpoints[{i}]", address_type)
        for i, ep in enumerate(_get(obj, "endpoints", list, where, []) or [])
    )
    return EndpointSlice(namespace, name, service, address_type, _shared(tuple(ports)), endpoints)


def _plain_endpoint(ep: Any, address_type: str) -> Endpoint | None:
    """The common endpoint (one canonical IPv4 address, boolean conditions, maybe a node and a zone, no
    hostname or hints) checked in one pass, without the text of a field's path made for every endpoint
    (half of a 100,000-endpoint start); None for anything else, which _parse_endpoint takes, and rejects
    naming the field when it is wrong."""
    if type(ep) is not dict or address_type != "IPv4" or ep.get("hostname") is not None or ep.get("hints"):
        return None
    addresses = ep.get("addresses")
    if type(addresses) is not list or not addresses or type(address := addresses[0]) is not str:
        return None
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, address)) != address:
            return None
    except OSError:
        return None
    cond = ep.get("conditions")
    if cond is None:
        cond = {}
    elif type(cond) is not dict:
        return None
    ready, serving, terminating = cond.get("ready"), cond.get("serving"), cond.get("terminating")
    ready = True if ready is None else ready
    serving = ready if serving is None else serving
    terminating = False if terminating is None else terminating
    if type(ready) is not bool or type(serving) is not bool or type(terminating) is not bool:
        return None
    node_name, zone = ep.get("nodeName"), ep.get("zone")
    if node_name is not None:
        if type(node_name) is not str:
            return None
        known = _NODE_NAMES.get(node_name)
        if known is None:  # a node met before is not checked again: a few thousand nodes, 100,000 endpoints
            if not _name_ok(node_name, _DNS1123_SUBDOMAIN, 253):
                return None
            if len(_NODE_NAMES) >= NODE_NAMES_KEPT:
                _NODE_NAMES.clear()
            known = _NODE_NAMES[node_name] = sys.intern(node_name)
        node_name = known
    if zone is not None:
        if type(zone) is not str or not _name_ok(zone, _LABEL_VALUE, 63):
            return None
        zone = sys.intern(zone)
    return Endpoint(address, ready, serving, terminating, node_name, zone)


def _parse_endpoint(ep: Any, at: str, address_type: str) -> Endpoint:
    if not isinstance(ep, dict):
        raise ManifestError(f"{at}: expected an object, got {ep!r}")
    addresses = _get(ep, "addresses", list, at, [])
    if not addresses:
        raise ManifestError(f"{at}.addresses: at least one address is required")
    if address_type == "FQDN":
        address = str(addresses[0])
    else:
        address = _ip(addresses[0], f"{at}.addresses[0]")
        if ("IPv6" if ":" in address else "IPv4") != address_type:
            raise ManifestError(f"{at}.addresses[0]: {address} is not an {address_type} address")
    cond = _get(ep, "conditions", dict, at, {})
    ready = _get(cond, "ready", bool, f"{at}.conditions", True)
    serving = _get(cond, "serving", bool, f"{at}.conditions", ready)
    terminating = _get(cond, "terminating", bool, f"{at}.conditions", False)
    hints = _get(ep, "hints", dict, at, {})
    zones = tuple(
        z.get("name") for z in _get(hints, "forZones", list, f"{at}.hints", []) if isinstance(z, dict) and z.get("name")
    )
    hostname = _get(ep, "hostname", str, at)
    if hostname is not None:
        check_name(hostname, _DNS1123_LABEL, 63, "a DNS-1123 label", f"{at}.hostname")
    node_name = _get(ep, "nodeName", str, at)
    if node_name is not None:
        check_name(node_name, _DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain", f"{at}.nodeName")
    zone = _get(ep, "zone", str, at)
    if zone is not None:
        check_name(zone, _LABEL_VALUE, 63, "a label value", f"{at}.zone")
    return Endpoint(
        address=address,
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=node_name,
        zone=zone,
        zone_hints=zones,
        hostname=hostname,
    )
