"""The pods handed over by noded-cni: their capture rules and listeners, kept in step with enrollment.

Each pod's record is a file under `<state dir>/pods/`, so a restarted daemon re-opens the listeners of
every pod still alive and drops the records of pods whose netns has gone. noded-cni leaves a record in
`<state dir>/pending/` for a pod it set up while the daemon was unreachable; the daemon takes those on
start (only with failPolicy open: otherwise the plugin fails closed while the daemon is unreachable, and
the daemon refuses a pod it has not seen yet, since its labels decide its capture).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import structlog

from noded.cni.plugin import valid_container_id
from noded.files import write_atomic
from noded.kernel import podns
from noded.model.pods import Enrollment
from noded.redirect.proxy import CaptureProxy

log = structlog.get_logger("noded.redirect")


class PodManager:
    def __init__(
        self,
        state_dir: str,
        enrollment: Enrollment,
        proxy: CaptureProxy,
        dns_only: bool = True,
        wait_for_pod: Callable[[str, str], bool] = lambda _ns, _name: True,
        direct_dns: tuple[str, ...] = (),
        cluster_dns: tuple[str, ...] = (),
    ) -> None:
        self.dir = os.path.join(state_dir, "pods")
        self.pending_dir = os.path.join(state_dir, "pending")
        self.enrollment = enrollment
        self.proxy = proxy
        self.dns_only = dns_only  # non-enrolled pods still get DNS interception
        self.direct_dns = direct_dns  # node-local DNS addresses the pods reach directly
        self.cluster_dns = cluster_dns  # the pods' nameserver addresses: their DNS is taken to noded
        self.pods: dict[str, dict] = {}  # container id -> record
        self._applied: dict[str, bool] = {}  # container id -> enrolled as installed
        self._lock = threading.RLock()
        self.wait_for_pod = wait_for_pod  # until the source has shown the pod's labels (or gives up)
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.pending_dir, exist_ok=True)

    # -- API -----------------------------------------------------------------------------
    def add(self, req: dict) -> dict:
        for field in ("containerId", "netns", "namespace", "name"):
            if not isinstance(req.get(field), str) or not req[field]:
                return {"ok": False, "error": f"{field} is required"}
        if not valid_container_id(req["containerId"]):  # it names a file under the state directory
            return {"ok": False, "error": "containerId: letters, digits, _ . - only, starting alphanumeric"}
        if not os.path.exists(req["netns"]):
            return {"ok": False, "error": f"netns {req['netns']} does not exist"}
        record = {k: req.get(k) for k in ("containerId", "netns", "namespace", "name", "ips")}
        if not self.wait_for_pod(record["namespace"], record["name"]):
            # its labels decide its capture: unknown is not "not enrolled" (kubelet tries again shortly)
            return {
                "ok": False,
                "retry": True,
                "error": f"pod {record['namespace']}/{record['name']} is not known to noded yet",
            }
        with self._lock:
            self.pods[record["containerId"]] = record
            write_atomic(self._path(record["containerId"]), json.dumps(record))
            enrolled = self._apply(record)
        return {"ok": True, "enrolled": enrolled}

    def delete(self, req: dict) -> dict:
        cid = req.get("containerId")
        if not isinstance(cid, str) or not valid_container_id(cid):
            return {"ok": False, "error": "containerId is required (letters, digits, _ . -)"}
        with self._lock:
            record = self.pods.pop(cid, None)
            self._applied.pop(cid, None)
            self.proxy.close_pod(cid)
            if record and os.path.exists(record["netns"]):
                try:
                    podns.uninstall(record["netns"])
                except podns.CaptureError as e:  # the netns is being torn down
                    log.info("capture removal skipped", pod=cid, reason=str(e))
            for path in (self._path(cid), os.path.join(self.pending_dir, f"{cid}.json")):
                if os.path.exists(path):
                    os.unlink(path)
        return {"ok": True}

    def check(self, req: dict) -> dict:
        cid = req.get("containerId", "")
        with self._lock:
            record = self.pods.get(cid)
        if record is None:
            return {"ok": False, "error": f"pod {cid} is not known to noded"}
        problems = []
        if cid not in self.proxy.pods:
            problems.append("listeners are not open")
        if not podns.has_capture(record["netns"]):
            problems.append("capture rules are missing")
        return {"ok": not problems, "error": "; ".join(problems)}

    def gc(self, req: dict) -> dict:
        """CNI GC: forget every pod not among the runtime's valid attachments."""
        valid = req.get("valid")
        if not isinstance(valid, list):
            return {"ok": False, "error": "valid must be a list of container ids"}
        with self._lock:
            stale = [cid for cid in self.pods if cid not in set(valid)]
        for cid in stale:
            self.delete({"containerId": cid})
        return {"ok": True, "removed": stale}

    def info(self, req: dict) -> dict:
        cid = req.get("containerId", "")
        with self._lock:
            record = self.pods.get(cid)
        return {
            "ok": record is not None,
            "pod": record,
            "enrolled": self._applied.get(cid),
            "listening": cid in self.proxy.pods,
            "recent": self.proxy.recent(cid),
        }

    def namespace_of(self, address: str) -> str | None:
        """The namespace of the pod noded-cni handed over with `address`, or None."""
        for record in list(self.pods.values()):
            if address in (record.get("ips") or []):
                return record["namespace"]
        return None

    # -- lifecycle --------------------------------------------------------------------------
    def restore(self) -> None:
        """On start: re-open every live pod's capture, take pods noded-cni left pending, drop the dead."""
        for directory in (self.dir, self.pending_dir):
            for fname in sorted(os.listdir(directory)):
                path = os.path.join(directory, fname)
                try:
                    with open(path) as f:
                        record = json.load(f)
                except (OSError, json.JSONDecodeError):
                    continue
                if not os.path.exists(record.get("netns", "")):
                    os.unlink(path)
                    log.info("pod gone while noded was down", pod=record.get("containerId"))
                    continue
                reply = self.add(record)
                log.info("pod repaired", pod=record.get("containerId"), ok=reply["ok"], pending=directory != self.dir)
                if directory == self.pending_dir:
                    os.unlink(path)

    def reconcile(self) -> None:
        """Enrollment may have changed (labels): re-install where it did. Raises when a pod's failed (after
        trying every other), so the runner retries it: its applied state is unchanged, still differing."""
        failed = self._reapply(
            lambda cid, r: self.enrollment.enrolled(r["namespace"], r["name"]) != self._applied.get(cid)
        )
        if failed:
            raise RuntimeError(f"capture update failed for {len(failed)} pods: {', '.join(sorted(failed)[:5])}")

    def set_cluster_dns(self, addresses: tuple[str, ...]) -> None:
        """The cluster DNS addresses changed (the kube-dns Service appeared or moved): every pod's rules."""
        with self._lock:
            if addresses == self.cluster_dns:
                return
            log.info("cluster DNS addresses", addresses=list(addresses))
            self.cluster_dns = addresses
            self._reapply(lambda _cid, _record: True)

    def _reapply(self, needed: Callable[[str, dict], bool]) -> list[str]:
        """Install again the capture of every pod `needed(container id, record)` names; a failure is logged
        and the others go on. The pods that failed."""
        failed = []
        with self._lock:
            for cid, record in list(self.pods.items()):
                if needed(cid, record):
                    try:
                        self._apply(record)
                    except (podns.CaptureError, OSError) as e:
                        log.error("capture update failed", pod=cid, error=str(e))
                        failed.append(cid)
        return failed

    def _apply(self, record: dict) -> bool:
        enrolled = self.enrollment.enrolled(record["namespace"], record["name"])
        if enrolled or self.dns_only:
            podns.install(record["netns"], enrolled, self.direct_dns, self.cluster_dns)
            self.proxy.open_pod(
                record["containerId"],
                record["netns"],
                record["namespace"],
                record["name"],
                record.get("ips") or (),
                mesh=enrolled,
            )
        else:
            podns.uninstall(record["netns"])
            self.proxy.close_pod(record["containerId"])
        self._applied[record["containerId"]] = enrolled
        log.info("pod captured", pod=f"{record['namespace']}/{record['name']}", enrolled=enrolled)
        return enrolled

    def _path(self, cid: str) -> str:
        return os.path.join(self.dir, f"{cid}.json")
