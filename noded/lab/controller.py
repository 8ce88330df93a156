"""The controllers the lab plays: ClusterIP, NodePort and load-balancer IP allocation, Node objects, and
EndpointSlices kept in step with lab pods (zone hints for PreferClose). Pure."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable, Iterator
from typing import Any

from noded.model.tracker import ZONE_LABEL

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR6 = "fd96::/112"
FIRST_HOST = 11  # leave .1-.10 for well-known services, as clusters do (.10: the cluster DNS address)
CLUSTER_DNS = ("10.96.0.10", "fd96::a")  # what the lab's kubelet would hand pods (kubeadm's convention)
NODE_PORT_RANGE = range(30000, 32768)
LB_CIDR = "10.77.100.0/24"  # the lab's load balancer (what MetalLB or a cloud would hand out)
LB_CIDR6 = "fd77:100::/120"
DUAL_STACK = ("PreferDualStack", "RequireDualStack")


def allocate_service_fields(docs: list[Any], state: dict[str, Any]) -> list[Any]:
    """What the API server and a load-balancer controller fill in: cluster IPs, node ports, health check
    node ports and load-balancer ingress IPs, each stable per service (kept in state)."""
    docs = allocate_cluster_ips(docs, state.setdefault("clusterIPs", {}), state.setdefault("clusterIPs6", {}))
    ports = state.setdefault("nodePorts", {})
    lb_ips = state.setdefault("lbIPs", {})
    lb_ips6 = state.setdefault("lbIPs6", {})
    out = []
    for doc in docs:
        if not (isinstance(doc, dict) and doc.get("kind") == "Service" and isinstance(doc.get("spec"), dict)):
            out.append(doc)
            continue
        spec, meta = doc["spec"], doc.get("metadata") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            for p in spec.get("ports") or []:
                if isinstance(p, dict) and not p.get("nodePort"):
                    p["nodePort"] = _allocate(
                        ports, f"{key}/{p.get('name', '')}/{p.get('protocol', 'TCP')}", NODE_PORT_RANGE
                    )
            if spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
                spec.setdefault("healthCheckNodePort", _allocate(ports, f"{key}/health", NODE_PORT_RANGE))
        if spec.get("type") == "LoadBalancer" and not (doc.get("status") or {}).get("loadBalancer"):
            ingress = []
            for family, pool, cidr in (("IPv4", lb_ips, LB_CIDR), ("IPv6", lb_ips6, LB_CIDR6)):
                if family in (spec.get("ipFamilies") or ["IPv4"]):
                    ingress.append({"ip": _allocate(pool, key, _hosts(cidr))})
            doc["status"] = {"loadBalancer": {"ingress": ingress}}
        out.append(doc)
    return out


def _allocate(allocated: dict[str, Any], key: str, candidates: Iterable[Any]) -> Any:
    """key's value in allocated, or the first candidate no other key holds (stable per key)."""
    if key not in allocated:
        used = set(allocated.values())
        allocated[key] = next(c for c in candidates if c not in used)
    return allocated[key]


def _hosts(cidr: str, first: int = 1) -> Iterator[str]:
    """cidr's host addresses from the first-th on."""
    return (str(ip) for i, ip in enumerate(ipaddress.ip_network(cidr).hosts(), start=1) if i >= first)


def node_object(node: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node["name"], "labels": {ZONE_LABEL: node["zone"]}},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node[field]} for field in ("address", "address6") if node.get(field)
            ]
        },
    }


def allocate_cluster_ips(
    docs: list[Any], allocated: dict[str, str], allocated6: dict[str, str] | None = None
) -> list[Any]:
    """Give every Service without cluster IPs some, as the API server does (stable per namespace/name):
    IPv4 from SERVICE_CIDR unless ipFamilies says otherwise, and IPv6 from SERVICE_CIDR6 too for
    PreferDualStack/RequireDualStack or ipFamilies naming IPv6. ipFamilies and ipFamilyPolicy are filled in.
    Other docs pass through."""
    allocated6 = {} if allocated6 is None else allocated6
    out = []
    for doc in docs:
        if not (isinstance(doc, dict) and doc.get("kind") == "Service" and isinstance(doc.get("spec"), dict)):
            out.append(doc)
            continue
        doc = copy.deepcopy(doc)
        spec, meta = doc["spec"], doc.get("metadata") or {}
        if spec.get("type") == "ExternalName" or spec.get("clusterIP") or spec.get("clusterIPs"):
            out.append(doc)
            continue
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        families = [f for f in spec.get("ipFamilies") or [] if f in ("IPv4", "IPv6")] or ["IPv4"]
        if spec.get("ipFamilyPolicy") in DUAL_STACK and len(families) == 1:
            families.append("IPv6" if families[0] == "IPv4" else "IPv4")
        pools = {"IPv4": (allocated, SERVICE_CIDR), "IPv6": (allocated6, SERVICE_CIDR6)}
        ips = [_allocate(pools[f][0], key, _hosts(pools[f][1], FIRST_HOST)) for f in families]
        spec["ipFamilies"] = families
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec["clusterIP"] = ips[0]
        spec["clusterIPs"] = ips
        out.append(doc)
    return out


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def endpoint_slices(services: list[dict], pods: list[dict], zones: dict[str, str] | None = None) -> list[dict]:
    """One EndpointSlice per IP family for every Service with a selector, from the pods it selects.

    zones maps node -> zone; PreferClose services get each endpoint hinted for its own zone."""
    zones = zones or {}
    slices = []
    for svc in services:
        spec = svc.get("spec") if isinstance(svc.get("spec"), dict) else {}
        selector = spec.get("selector")
        meta = svc.get("metadata") or {}
        ns, name = meta.get("namespace") or "default", meta.get("name")
        if not isinstance(selector, dict) or not name or spec.get("type") == "ExternalName":
            continue
        ports = []
        for p in spec.get("ports") or []:
            if not isinstance(p, dict):
                continue
            target = p.get("targetPort", p.get("port"))
            ports.append(
                {
                    "name": p.get("name", ""),
                    "protocol": p.get("protocol", "TCP"),
                    "port": target if isinstance(target, int) else p.get("port"),
                }
            )
        selected = [pod for pod in pods if pod["namespace"] == ns and _selects(selector, pod.get("labels", {}))]
        for family in spec.get("ipFamilies") or ["IPv4"]:  # one slice per family the service has, as the API's
            endpoints = []
            for pod in sorted(selected, key=lambda p: p["name"]):
                ips = [ip for ip in pod.get("ips", []) if f"IPv{ipaddress.ip_address(ip).version}" == family]
                if not ips:
                    continue
                terminating = bool(pod.get("terminating"))
                ready = bool(pod.get("ready", True)) and not terminating
                ep: dict[str, Any] = {
                    "addresses": [ips[0]],
                    "conditions": {
                        "ready": ready,
                        "serving": bool(pod.get("ready", True)),
                        "terminating": terminating,
                    },
                    "nodeName": pod["node"],
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod["name"]},
                }
                zone = zones.get(pod["node"])
                if zone:
                    ep["zone"] = zone
                    if spec.get("trafficDistribution") == "PreferClose":
                        ep["hints"] = {"forZones": [{"name": zone}]}
                endpoints.append(ep)
            slices.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{name}-lab-{family.lower()}",
                        "namespace": ns,
                        "labels": {
                            "kubernetes.io/service-name": name,
                            "endpointslice.kubernetes.io/managed-by": "noded-lab",
                        },
                    },
                    "addressType": family,
                    "ports": ports,
                    "endpoints": endpoints,
                }
            )
    return slices


def pod_object(pod: dict) -> dict:
    ready = bool(pod.get("ready", True)) and not pod.get("terminating")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod["name"], "namespace": pod["namespace"], "labels": pod.get("labels", {})},
        "spec": {"nodeName": pod["node"], "serviceAccountName": pod.get("serviceAccount", "default")},
        "status": {
            "phase": "Running",
            "podIP": (pod.get("ips") or [None])[0],
            "podIPs": [{"ip": ip} for ip in pod.get("ips", [])],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
