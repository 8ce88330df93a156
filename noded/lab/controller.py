"""The controllers the lab plays: ClusterIP allocation and EndpointSlices kept in step with lab pods. Pure."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

SERVICE_CIDR = "10.96.0.0/16"
FIRST_HOST = 10  # leave .1-.9 for well-known services, as clusters do


def allocate_cluster_ips(docs: list[Any], allocated: dict[str, str], cidr: str = SERVICE_CIDR) -> list[Any]:
    """Give every Service without a clusterIP one from cidr (stable per namespace/name); other docs pass through."""
    used = set(allocated.values())
    pool = (str(ip) for i, ip in enumerate(ipaddress.ip_network(cidr).hosts()) if i + 1 >= FIRST_HOST)
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
        ip = allocated.get(key)
        if ip is None:
            ip = next(candidate for candidate in pool if candidate not in used)
            allocated[key] = ip
            used.add(ip)
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]
        out.append(doc)
    return out


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def endpoint_slices(services: list[dict], pods: list[dict]) -> list[dict]:
    """One EndpointSlice per IP family for every Service with a selector, from the pods it selects."""
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
        for family in ("IPv4", "IPv6"):
            endpoints = []
            for pod in sorted(selected, key=lambda p: p["name"]):
                ips = [ip for ip in pod.get("ips", []) if f"IPv{ipaddress.ip_address(ip).version}" == family]
                if not ips:
                    continue
                terminating = bool(pod.get("terminating"))
                ready = bool(pod.get("ready", True)) and not terminating
                endpoints.append(
                    {
                        "addresses": [ips[0]],
                        "conditions": {
                            "ready": ready,
                            "serving": bool(pod.get("ready", True)),
                            "terminating": terminating,
                        },
                        "nodeName": pod["node"],
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": pod["name"]},
                    }
                )
            if family == "IPv6" and not endpoints:
                continue
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
