"""Builders for Service and EndpointSlice objects in tests."""

from __future__ import annotations


def service(
    name: str,
    cluster_ips: list[str] | str = "10.96.0.10",
    ports: list[dict] | None = None,
    namespace: str = "default",
    **spec: object,
) -> dict:
    ips = [cluster_ips] if isinstance(cluster_ips, str) else cluster_ips
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ports": ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}],
            **spec,
        },
    }


def endpoint(
    ip: str,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    node: str | None = None,
    zone_hints: list[str] | None = None,
) -> dict:
    conditions = {"ready": ready, "terminating": terminating}
    if serving is not None:
        conditions["serving"] = serving
    ep: dict = {"addresses": [ip], "conditions": conditions}
    if node:
        ep["nodeName"] = node
    if zone_hints is not None:
        ep["hints"] = {"forZones": [{"name": z} for z in zone_hints]}
    return ep


def slice_(
    service_name: str,
    endpoints: list[dict],
    ports: list[dict] | None = None,
    name: str | None = None,
    namespace: str = "default",
    address_type: str = "IPv4",
) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-abc",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }
