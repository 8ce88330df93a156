"""Which pods on this node are enrolled in the mesh, from Pod and Namespace labels. Pure.

Istio ambient's rule: the pod label `istio.io/dataplane-mode` decides when set (`ambient` in, `none`
out); otherwise the namespace label does. hostNetwork pods never are. It also knows which of this
node's pods holds an address (status.podIPs), for the DNS listener's client check and search path.
"""

from __future__ import annotations

import threading

LABEL = "istio.io/dataplane-mode"
PodKey = tuple[str, str]  # (namespace, name)


class Enrollment:
    def __init__(self, node_name: str | None = None) -> None:
        self.node_name = node_name  # pod addresses are kept for this node's pods only (None: every pod)
        self._pods: dict[PodKey, tuple[dict[str, str], bool]] = {}  # labels, hostNetwork
        self._addresses: dict[PodKey, list[str]] = {}
        self._accounts: dict[PodKey, str] = {}  # this node's pods: their service account
        self._by_address: dict[str, str] = {}  # pod address -> namespace
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
                self._pods[key] = (labels, host)
                local = not self.node_name or spec.get("nodeName") == self.node_name
                self._set_addresses(key, [] if host or not local else _pod_ips(obj.get("status") or {}))
                if local and not host:
                    self._accounts[key] = spec.get("serviceAccountName") or "default"
                else:
                    self._accounts.pop(key, None)
                return True
            if kind == "Namespace":
                self._namespaces[meta.get("name", "")] = labels
                return True
        return False

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            if kind == "Pod":
                self._pods.pop((namespace, name), None)
                self._accounts.pop((namespace, name), None)
                self._set_addresses((namespace, name), [])
            elif kind == "Namespace":
                self._namespaces.pop(name, None)

    def _set_addresses(self, key: PodKey, ips: list[str]) -> None:
        for ip in self._addresses.pop(key, []):
            self._by_address.pop(ip, None)
        if ips:
            self._addresses[key] = ips
            self._by_address.update(dict.fromkeys(ips, key[0]))

    def namespace_of(self, address: str) -> str | None:
        """The namespace of this node's pod holding `address`, or None."""
        return self._by_address.get(address)

    def knows(self, namespace: str, name: str) -> bool:
        with self._lock:
            return (namespace, name) in self._pods

    def enrolled(self, namespace: str, name: str) -> bool:
        with self._lock:
            labels, host = self._pods.get((namespace, name), ({}, False))
            if host:
                return False
            mode = labels.get(LABEL) or self._namespaces.get(namespace, {}).get(LABEL)
            return mode == "ambient"

    def enrolled_accounts(self) -> set[tuple[str, str]]:
        """(namespace, service account) of this node's enrolled pods: the identities the tunnel needs."""
        with self._lock:
            keys = list(self._accounts.items())
        return {(key[0], account) for key, account in keys if self.enrolled(*key)}

    def enrolled_namespaces(self) -> list[str]:
        with self._lock:
            return sorted(ns for ns, labels in self._namespaces.items() if labels.get(LABEL) == "ambient")


def _pod_ips(status: dict) -> list[str]:
    ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)] or [status.get("podIP")]
    return [ip for ip in ips if isinstance(ip, str) and ip]
