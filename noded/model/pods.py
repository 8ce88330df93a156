"""Which pods on this node are enrolled in the mesh, from Pod and Namespace labels. Pure.

Istio ambient's rule: the pod label `istio.io/dataplane-mode` decides when set (`ambient` in, `none`
out); otherwise the namespace label does. hostNetwork pods never are. It also knows which of this
node's pods holds an address (status.podIPs), for the DNS listener's client check and search path.

Other nodes' pods (the tunnel's facts: address, service account, labels) come from the source like this
node's, or, with `remote_from_stream`, only from the CA node's workload stream (tunnel/workloads.py), the
source then watching this node's Pods alone: what a node receives no longer grows with the cluster.
Listeners hear of every pod change (the CA node's feed); watchers of every change to this node's pods or to
a namespace (the capture and the certificates follow enrollment). One of the model's owners (hub.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

LABEL = "istio.io/dataplane-mode"
PodKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
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
    def __init__(self, node_name: str | None = None, remote_from_stream: bool = False) -> None:
        self.node_name = node_name  # this node (None: every pod counts as local)
        self.remote_from_stream = remote_from_stream  # other nodes' pods: from the stream, never the source
        self.remote_synced = not remote_from_stream  # the stream's first snapshot is in
        self._pods: dict[PodKey, PodInfo] = {}
        self._by_address: dict[str, PodKey] = {}  # every pod's address (hostNetwork ones aside)
        self._namespaces: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self.listeners: list[Callable[[PodKey, PodInfo | None], None]] = []  # told of each pod change
        self.watchers: list[Callable[[], None]] = []  # told when this node's pods or a namespace changed

    def upsert(self, obj: dict) -> bool:
        """Track a Pod or Namespace; True when it is one of those kinds."""
        kind = obj.get("kind")
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict):
            labels = {}
        if kind == "Pod":
            spec = obj.get("spec") or {}
            host = bool(spec.get("hostNetwork"))
            key = (meta.get("namespace") or "default", meta.get("name", ""))
            local = not self.node_name or spec.get("nodeName") == self.node_name
            if not local and self.remote_from_stream:
                return True  # another node's pod: the workload stream's to tell
            ips = () if host else tuple(_pod_ips(obj.get("status") or {}))
            account = spec.get("serviceAccountName") or "default"
            info = PodInfo(labels, host, local, spec.get("nodeName") or "", ips, account, workload_name(meta))
            self._set(key, info)
            return True
        if kind == "Namespace":
            with self._lock:
                name = meta.get("name", "")
                changed = self._namespaces.get(name) != labels
                self._namespaces[name] = labels
            if changed:
                self._changed()
            return True
        return False

    def delete(self, kind: str, namespace: str, name: str) -> None:
        if kind == "Pod":
            pod = self._pods.get((namespace, name))
            if pod is not None and (pod.local or not self.remote_from_stream):
                self._set((namespace, name), None)
            return
        if kind == "Namespace":
            with self._lock:
                gone = self._namespaces.pop(name, None) is not None
            if gone:
                self._changed()

    # -- other nodes' pods, from the workload stream ---------------------------------------------
    def set_remote(self, key: PodKey, info: PodInfo | None) -> None:
        """Another node's pod (None: gone), as the stream tells it; this node's own are the source's."""
        held = self._pods.get(key)
        if info is not None and (info.local or info.node == self.node_name):
            return
        if held is not None and held.local:
            return
        self._set(key, info)

    def replace_remote(self, pods: dict[PodKey, PodInfo]) -> None:
        """The stream's snapshot: other nodes' pods are exactly these from now on."""
        for key in [k for k, p in list(self._pods.items()) if not p.local and k not in pods]:
            self._set(key, None)
        for key, info in pods.items():
            self.set_remote(key, info)
        self.remote_synced = True

    def snapshot(self) -> list[tuple[PodKey, PodInfo]]:
        with self._lock:
            return list(self._pods.items())

    def _set(self, key: PodKey, info: PodInfo | None) -> None:
        with self._lock:
            old = self._pods.pop(key, None)
            for ip in old.ips if old else ():
                if self._by_address.get(ip) == key:
                    del self._by_address[ip]
            if info is not None:
                self._pods[key] = info
                self._by_address.update(dict.fromkeys(info.ips, key))
        if (info is not None or old is not None) and info != old:
            for listener in self.listeners:
                listener(key, info)
            if (info is not None and info.local) or (old is not None and old.local):
                self._changed()

    def _changed(self) -> None:
        for watcher in self.watchers:
            watcher()

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
