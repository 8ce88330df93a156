"""Is this noded being uninstalled, or only restarted? Asked of the DaemonSet it runs from, at shutdown.

A DaemonSet's pods get SIGTERM both when the DaemonSet is deleted and when a rolling update replaces them.
Like istio-cni's node agent (istio/istio#54180), noded reads its own DaemonSet (`NODED_DAEMONSET=
namespace/name`, set in deploy/daemonset.yaml) from its source: gone, or carrying a deletionTimestamp, is an
uninstall (the caller removes its kernel state and CNI chain); still there is a restart or an upgrade
(everything stays, so pods keep their dataplane until the next pod takes over); no answer is treated as a
restart — a lost API server must not take the node's dataplane with it. The manifest-directory source
plays the API server here too: the DaemonSet object in one of its files. Without NODED_DAEMONSET (the
systemd unit) nothing asks.
"""

from __future__ import annotations

import json
import os
import time

import structlog
import yaml

from noded.config import SourceConfig
from noded.sources.directory import SUFFIXES, parse_manifests

log = structlog.get_logger("noded.sources.owner")

ENV = "NODED_DAEMONSET"
ATTEMPTS = 3
TIMEOUT = 2.0  # per attempt: the whole answer fits in the DaemonSet's termination grace period


def daemonset_ref(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(namespace, name) from NODED_DAEMONSET, or None when unset or malformed (logged)."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not value:
        return None
    namespace, _, name = value.partition("/")
    if not namespace or not name or "/" in name:
        log.error("ignored: not namespace/name", variable=ENV, value=value)
        return None
    return namespace, name


def removed(source: SourceConfig, ref: tuple[str, str]) -> bool | None:
    """True: the DaemonSet is gone or being deleted; False: it is there; None: no answer."""
    if source.directory:
        return _removed_in_directory(source.directory, ref)
    return _removed_in_api(source, ref)


def _is_deleted(obj: dict | None) -> bool:
    return obj is None or bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _removed_in_directory(path: str, ref: tuple[str, str]) -> bool | None:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        log.warning("cannot read the manifest directory to tell an uninstall from a restart", error=str(e))
        return None
    for name in names:
        if name.startswith(".") or not name.endswith(SUFFIXES):
            continue
        try:
            with open(os.path.join(path, name)) as f:
                docs = parse_manifests(f.read(), name)
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        for doc in docs:
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            if (
                isinstance(meta, dict)
                and doc.get("kind") == "DaemonSet"
                and (meta.get("namespace") or "default", meta.get("name")) == ref
            ):
                return _is_deleted(doc)
    return True


def _removed_in_api(source: SourceConfig, ref: tuple[str, str]) -> bool | None:
    from noded.sources.kubeclient import ApiError, load

    namespace, name = ref
    try:
        api = load(source.kubeconfig, source.inCluster, source.apiServer)
    except Exception as e:  # no token, no kubeconfig: nobody to ask
        log.warning("cannot ask the API server whether noded is being uninstalled", error=str(e))
        return None
    for attempt in range(ATTEMPTS):
        try:
            resp = api.get(f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}", timeout=TIMEOUT)
            return _is_deleted(json.loads(resp.data) or {})
        except ApiError as e:
            if e.status == 404:
                return True
            error = f"{e.status} {e.reason}"
        except Exception as e:  # connection refused, timeouts: the API server is not there
            error = f"{type(e).__name__}: {e}"
        log.warning("reading noded's DaemonSet failed", daemonset="/".join(ref), attempt=attempt + 1, error=error)
        time.sleep(0.2)
    return None


def uninstalling(source: SourceConfig, environ: dict[str, str] | None = None) -> bool:
    """True only when NODED_DAEMONSET is set and names a DaemonSet that is gone or being deleted."""
    ref = daemonset_ref(environ)
    if ref is None:
        return False
    verdict = removed(source, ref)
    what = {True: "uninstall", False: "restart or upgrade", None: "unknown: treated as a restart"}[verdict]
    log.info("noded's DaemonSet read at shutdown", daemonset="/".join(ref), verdict=what)
    return verdict is True
