"""Which pods on this node are enrolled in the mesh, from Pod and Namespace labels. Pure.

Istio ambient's rule: the pod label `istio.io/dataplane-mode` decides when set (`ambient` in, `none`
out); otherwise the namespace label does. hostNetwork pods never are.
"""

from __future__ import annotations

import threading

LABEL = "istio.io/dataplane-mode"
PodKey = tuple[str, str]  # (namespace, name)


class Enrollment:
    def __init__(self) -> None:
        self._pods: dict[PodKey, tuple[dict[str, str], bool]] = {}  # labels, hostNetwork
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
                host = bool((obj.get("spec") or {}).get("hostNetwork"))
                self._pods[(meta.get("namespace") or "default", meta.get("name", ""))] = (labels, host)
                return True
            if kind == "Namespace":
                self._namespaces[meta.get("name", "")] = labels
                return True
        return False

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            if kind == "Pod":
                self._pods.pop((namespace, name), None)
            elif kind == "Namespace":
                self._namespaces.pop(name, None)

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

    def enrolled_namespaces(self) -> list[str]:
        with self._lock:
            return sorted(ns for ns, labels in self._namespaces.items() if labels.get(LABEL) == "ambient")
