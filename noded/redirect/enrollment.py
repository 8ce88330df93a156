"""Which pods on this node are enrolled in the mesh, from Pod and Namespace labels. Pure.

Istio ambient's rule: the pod label `istio.io/dataplane-mode` decides when set (`ambient` in, `none`
out); otherwise the namespace label does. hostNetwork pods never are. It also knows which of this
node's pods holds an address (status.podIPs), for the DNS listener's client check and search path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

LABEL = "istio.io/dataplane-mode"
PodKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class PodInfo:
    labels: dict[str, str]
    host_network: bool
    local: bool  # runs on this node
    node: str
    ips: tuple[str, ...]
    account: str  # service account
    workload: str = ""  # its workload's name: the owner (a ReplicaSet's hash taken off), else the pod's name


def workload_name(meta: dict) -> str:
    """A pod's workload as Istio names it: its controller's name, a Deployment's (the ReplicaSet's pod-
    template hash taken off) for a ReplicaSet's pods; the pod's own name without a controller."""
    owners = meta.get("ownerReferences") if isinstance(meta.get("ownerReferences"), list) else []
    owner = next((o for o in owners if isinstance(o, dict) and o.get("controller")), None)
    owner = owner or next((o for o in owners if isinstance(o, dict)), None)
    name = str(owner.get("name") or "") if owner else ""
    if owner and owner.get("kind") == "ReplicaSet" and "-" in name:
        base, _, suffix = name.rpartition("-")
        if base and suffix.isalnum() and 5 <= len(suffix) <= 10:
            name = base
    return name or str(meta.get("name") or "")


class Enrollment:
    def __init__(self, node_name: str | None = None) -> None:
        self.node_name = node_name  # this node (None: every pod counts as local)
        self._pods: dict[PodKey, PodInfo] = {}
        self._by_address: dict[str, PodKey] = {}  # every pod's address (hostNetwork ones aside)
        self._namespaces: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def upsert(self, obj: dict) -> bool:
        """Track a Pod or Namespace; True when it is one of those kinds."""
        kind = obj.get("kind")
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict):
            labels = {}
        with self._lock:
            if kind == "Pod":
                spec = obj.get("spec") or {}
                host = bool(spec.get("hostNetwork"))
                key = (meta.get("namespace") or "default", meta.get("name", ""))
                local = not self.node_name or spec.get("nodeName") == self.node_name
                ips = () if host else tuple(_pod_ips(obj.get("status") or {}))
                self._forget(key)
                account = spec.get("serviceAccountName") or "default"
                workload = workload_name(meta)
                self._pods[key] = PodInfo(labels, host, local, spec.get("nodeName") or "", ips, account, workload)
                self._by_address.update(dict.fromkeys(ips, key))
                return True
            if kind == "Namespace":
                self._namespaces[meta.get("name", "")] = labels
                return True
        return False

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            if kind == "Pod":
                self._forget((namespace, name))
            elif kind == "Namespace":
                self._namespaces.pop(name, None)

    def _forget(self, key: PodKey) -> None:
        old = self._pods.pop(key, None)
        for ip in old.ips if old else ():
            if self._by_address.get(ip) == key:
                del self._by_address[ip]

    def namespace_of(self, address: str) -> str | None:
        """The namespace of this node's pod holding `address`, or None."""
        key = self._by_address.get(address)
        pod = self._pods.get(key) if key else None
        return key[0] if pod is not None and pod.local else None

    def workload_at(self, address: str) -> PodKey | None:
        """The pod (on any node) holding `address`."""
        return self._by_address.get(address)

    def pod(self, key: PodKey) -> PodInfo | None:
        return self._pods.get(key)

    def knows(self, namespace: str, name: str) -> bool:
        with self._lock:
            return (namespace, name) in self._pods

    def enrolled(self, namespace: str, name: str) -> bool:
        with self._lock:
            pod = self._pods.get((namespace, name))
            labels, host = (pod.labels, pod.host_network) if pod else ({}, False)
            if host:
                return False
            mode = labels.get(LABEL) or self._namespaces.get(namespace, {}).get(LABEL)
            return mode == "ambient"

    def enrolled_accounts(self, node: str | None = None) -> set[tuple[str, str]]:
        """(namespace, service account) of the enrolled pods of this node (or of `node`): the identities
        the tunnel needs there."""
        with self._lock:
            pods = [
                (key, pod.account)
                for key, pod in self._pods.items()
                if (pod.local if node is None else pod.node == node)
            ]
        return {(key[0], account) for key, account in pods if self.enrolled(*key)}

    def enrolled_namespaces(self) -> list[str]:
        with self._lock:
            return sorted(ns for ns, labels in self._namespaces.items() if labels.get(LABEL) == "ambient")


def _pod_ips(status: dict) -> list[str]:
    ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)] or [status.get("podIP")]
    return [ip for ip in ips if isinstance(ip, str) and ip]
