"""The Kubernetes API source: list then watch per kind (the client: kubeclient.py).

Watches resume from the last resourceVersion (kept fresh by bookmarks), relist
on 410 Gone, and reconnect with capped exponential backoff. A relist is applied
as a diff, so objects that did not change are not touched.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from noded.sources.base import Ahead, ObjectKey, Sink, api_fingerprint, apply_snapshot, object_key
from noded.sources.kubeclient import ApiClient

log = structlog.get_logger("noded.sources.kube")

WATCH_TIMEOUT_SECONDS = 300
PAGE_SIZE = 500
PROGRESS_EVERY = 5.0  # seconds between progress lines of a long list


class Gone(Exception):
    """The resourceVersion we hold is too old: relist."""


@dataclass(frozen=True)
class WatchedKind:
    kind: str
    api_version: str
    lister: Callable[[ApiClient, str], Callable[..., object]]  # (api, node name) -> list function
    optional: bool = False  # a CRD the cluster may not have: 404 counts as synced and empty (retried)

    @property
    def resource(self) -> str:
        """As RBAC names it: group/plural (core: plural)."""
        group = self.api_version.rpartition("/")[0]
        lower = self.kind.lower()
        plural = lower[:-1] + "ies" if lower.endswith("y") else lower + ("es" if lower.endswith("s") else "s")
        return f"{group}/{plural}" if group else plural


ESSENTIAL = ("Service", "EndpointSlice")  # what the first sync of the services waits for, as kube-proxy
RETRY_AFTER_MAX = 60.0


def classify(error: BaseException) -> tuple[str, float | None]:
    """client-go's view of a failed request: its class (the HTTP status, 5xx, timeout, connection) and, for
    429 and 5xx answers that carry one, the Retry-After to honour."""
    status = getattr(error, "status", None)
    headers = getattr(error, "headers", None) or {}
    retry_after = None
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if value is not None and (status == 429 or (isinstance(status, int) and status >= 500)):
        try:
            retry_after = min(max(float(value), 0.0), RETRY_AFTER_MAX)
        except ValueError:
            retry_after = None
    if isinstance(status, int) and status:
        return ("5xx" if status >= 500 else str(status)), retry_after
    name = type(error).__name__.lower()
    return ("timeout" if "timeout" in name or "timed out" in str(error).lower() else "connection"), None


class WatchError(Exception):
    """A watch stream's ERROR event other than 410: status and message as the API server sent them."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Get:
    """A list (or watch) of one resource: GET `path` through the API client, the query from keyword names
    (client-go's list options), the body not read: the urllib3 response."""

    QUERY: ClassVar[dict[str, str]] = {
        "limit": "limit",
        "_continue": "continue",
        "watch": "watch",
        "resource_version": "resourceVersion",
        "allow_watch_bookmarks": "allowWatchBookmarks",
        "timeout_seconds": "timeoutSeconds",
        "field_selector": "fieldSelector",
    }

    def __init__(self, api: ApiClient, path: str, **fixed: object) -> None:
        self.api, self.path, self.fixed = api, path, fixed

    def __call__(self, _request_timeout: Any = None, **params: object) -> Any:
        query = {self.QUERY[k]: _query_value(v) for k, v in {**self.fixed, **params}.items() if v is not None}
        return self.api.get(self.path, query, _request_timeout)


def _query_value(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _listed(path: str, selector: Callable[[str], str] | None = None):
    """(api, node name) -> the list function of `path` (with a field selector made from the node's name)."""
    if selector is None:
        return lambda api, _node: Get(api, path)
    return lambda api, node: Get(api, path, field_selector=selector(node))


def _custom(kind: str, group: str, version: str, plural: str) -> WatchedKind:
    """A custom resource listed cluster-wide; optional: a cluster without its CRD serves none (404)."""
    return WatchedKind(kind, f"{group}/{version}", _listed(f"/apis/{group}/{version}/{plural}"), optional=True)


KINDS = {
    "Service": WatchedKind("Service", "v1", _listed("/api/v1/services")),
    "EndpointSlice": WatchedKind(
        "EndpointSlice", "discovery.k8s.io/v1", _listed("/apis/discovery.k8s.io/v1/endpointslices")
    ),
    # every pod, as ztunnel knows every workload: the tunnel must tell a meshed pod on another node (a node
    # that takes other nodes' pods from the CA node's stream watches its own only: OWN_PODS)
    "Pod": WatchedKind("Pod", "v1", _listed("/api/v1/pods")),
    "AuthorizationPolicy": _custom("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies"),
    "Namespace": WatchedKind("Namespace", "v1", _listed("/api/v1/namespaces")),
    # the waypoint's API (gateway.networking.k8s.io/v1); optional: a cluster without the Gateway API CRDs
    "Gateway": _custom("Gateway", "gateway.networking.k8s.io", "v1", "gateways"),
    "HTTPRoute": _custom("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
    # only this node's own Node object (its zone label), as kube-proxy watches it
    "Node": WatchedKind("Node", "v1", _listed("/api/v1/nodes", lambda node: f"metadata.name={node}")),
}


OWN_PODS = WatchedKind("Pod", "v1", _listed("/api/v1/pods", lambda node: f"spec.nodeName={node}"))


def _lines(resp) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class KindWatcher:
    """List/watch of one kind, feeding the sink."""

    def __init__(
        self,
        api: ApiClient,
        kind: WatchedKind,
        sink: Sink,
        on_synced: Callable[[], None],
        stop: threading.Event,
        max_backoff: float = 30.0,
        node_name: str = "",
    ) -> None:
        self.kind = kind
        self.sink = sink
        self._list = kind.lister(api, node_name)
        self._on_synced = on_synced
        self._stop = stop
        self._max_backoff = max_backoff
        self.known: dict[ObjectKey, bytes] = {}
        self.resource_version = ""
        self.synced = False
        self.relists = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.errors: collections.Counter[str] = collections.Counter()  # by class: 401, 403, 429, 5xx, timeout...
        self.verb = "list"

    def run(self) -> None:
        backoff = 0.5
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                self.watch()
                backoff = 0.5
            except Gone:
                log.info("resourceVersion expired, relisting", kind=self.kind.kind)
                need_list = True
            except Exception as e:  # connection refused/reset, timeouts, HTTP errors
                status = getattr(e, "status", None)
                if status == 410:
                    need_list = True
                    continue
                if status == 404 and self.kind.optional:
                    self._absent()
                    continue
                cls, retry_after = classify(e)
                self.errors[cls] += 1
                self.reconnects += 1
                self.last_error = f"{cls} on {self.verb} {self.kind.resource}: {str(e).splitlines()[0][:200]}"
                delay = retry_after if retry_after is not None else backoff * (1 + random.random() * 0.2)
                log.warning(
                    "API request failed, retrying",
                    kind=self.kind.kind,
                    resource=self.kind.resource,
                    verb=self.verb,
                    error=cls,
                    detail=self.last_error,
                    retry_in=round(delay, 2),
                    retry_after=retry_after is not None,
                )
                self._stop.wait(delay)
                if retry_after is None:
                    backoff = min(backoff * 2, self._max_backoff)
                if cls in ("401", "403", "5xx"):
                    need_list = True  # the state may have moved on meanwhile: list again, as client-go does

    def _absent(self) -> None:
        """An optional kind this API server does not serve (its CRD is not installed): nothing of it
        exists; the sync goes on without it, and it is looked for again every max_backoff seconds. Once
        it has been listed, a 404 keeps what was known (a CRD briefly missing while an API server restarts
        must not empty every AuthorizationPolicy: policy fails closed)."""
        if self.relists:
            log.warning("kind no longer served; last known objects kept", kind=self.kind.kind, objects=len(self.known))
            self._stop.wait(self._max_backoff)
            return
        self.last_error = None
        self.known = apply_snapshot(self.sink, self.known, {})
        if not self.synced:
            log.info("kind not served by the API server; none assumed", kind=self.kind.kind)
            self.synced = True
            self._on_synced()
        self._stop.wait(self._max_backoff)

    def _page(self, cont: str | None) -> dict:
        """One page of the list, parsed (the first with cont None)."""
        kwargs: dict[str, object] = {"limit": PAGE_SIZE, "_request_timeout": 60}
        if cont:
            kwargs["_continue"] = cont
        return json.loads(self._list(**kwargs).data)

    def relist(self) -> None:
        """List (paginated), then make the sink see exactly that. The first list of a kind is applied page
        by page (nothing to delete yet): the whole list is never held at once, which at 150,000 pods is
        gigabytes. Later lists (after a 410, a 403) are applied whole: deletions first. The next page is
        asked for while this one is applied (never more than two pages held)."""
        self.verb = "list"
        fresh: dict[ObjectKey, dict] = {}
        incremental = not self.known
        started = time.monotonic()
        reported = started
        body = self._page(None)
        while True:
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            ahead = Ahead(self._page, cont, name="list-ahead") if cont else None
            for item in body.get("items") or []:
                item.setdefault("kind", self.kind.kind)
                item.setdefault("apiVersion", self.kind.api_version)
                key = object_key(item)
                if key is None:
                    continue
                if incremental:  # known as it is applied: a list broken off is finished by the next, whole
                    self.known[key] = api_fingerprint(item)
                    self.sink.upsert(item)
                else:
                    fresh[key] = item
            if ahead is None:
                self.resource_version = meta.get("resourceVersion", "")
                break
            if time.monotonic() - reported >= PROGRESS_EVERY:  # a long initial list shows it is moving
                reported = time.monotonic()
                left = meta.get("remainingItemCount")
                count = len(self.known) if incremental else len(fresh)
                log.info("listing", kind=self.kind.kind, objects=count, remaining=left, seconds=_since(started))
            body = ahead.result()
        listed = time.monotonic()
        if not incremental:
            self.known = apply_snapshot(self.sink, self.known, fresh, api_fingerprint)
        if time.monotonic() - started >= PROGRESS_EVERY or not self.synced:
            log.info(
                "listed",
                kind=self.kind.kind,
                objects=len(self.known),
                list_seconds=_since(started, listed),
                apply_seconds=_since(listed),
            )
        self.relists += 1
        self.last_error = None
        if not self.synced:
            self.synced = True
            self._on_synced()

    def watch(self) -> None:
        self.verb = "watch"
        resp = self._list(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_SECONDS,
            _request_timeout=(10, WATCH_TIMEOUT_SECONDS + 30),
        )
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    return
                self._event(json.loads(line))
        finally:
            resp.release_conn()

    def _event(self, event: dict) -> None:
        etype, obj = event.get("type"), event.get("object") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise WatchError(int(obj.get("code") or 500), f"watch error: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        obj.setdefault("kind", self.kind.kind)
        obj.setdefault("apiVersion", self.kind.api_version)
        key = object_key(obj)
        if key is None:
            log.error("watch event without a usable object", kind=self.kind.kind, type=etype)
        elif etype in ("ADDED", "MODIFIED"):
            self.known[key] = api_fingerprint(obj)
            self.sink.upsert(obj)
        elif etype == "DELETED":
            self.known.pop(key, None)
            self.sink.delete(*key)
        if rv:
            self.resource_version = rv


class KubeSource:
    """One watcher thread per kind; synced once every kind has listed."""

    name = "kubernetes"

    def __init__(
        self,
        api: ApiClient,
        sink: Sink,
        kinds: tuple[str, ...] = ("Service", "EndpointSlice", "Node"),
        max_backoff: float = 30.0,
        node_name: str = "",
        own_pods_only: bool = False,
    ) -> None:
        self.sink = sink
        self._stop = threading.Event()
        watched = {**KINDS, "Pod": OWN_PODS} if own_pods_only and node_name else KINDS
        self._pending = set(kinds) & set(ESSENTIAL) or set(kinds)  # the others arrive as they list
        self.synced_kinds: set[str] = set()
        self._lock = threading.Lock()
        self.watchers = {
            k: KindWatcher(api, watched[k], sink, lambda k=k: self._kind_synced(k), self._stop, max_backoff, node_name)
            for k in kinds
        }
        self._threads = [
            threading.Thread(target=w.run, name=f"watch-{k}", daemon=True) for k, w in self.watchers.items()
        ]

    @property
    def synced(self) -> bool:
        return not self._pending

    @property
    def last_error(self) -> str | None:
        return next((w.last_error for w in self.watchers.values() if w.last_error), None)

    def kind_synced(self, kind: str) -> bool:
        return kind in self.synced_kinds

    def errors(self) -> int:
        return sum(sum(w.errors.values()) for w in self.watchers.values())

    def status(self) -> dict:
        """Per kind: listed yet, the last error (class, verb, resource), errors by class, relists."""
        return {
            kind: {
                "synced": w.synced,
                "lastError": w.last_error,
                "errors": dict(w.errors),
                "relists": w.relists,
            }
            for kind, w in self.watchers.items()
        }

    def _kind_synced(self, kind: str) -> None:
        with self._lock:
            self.synced_kinds.add(kind)
            if not self._pending:
                return  # synced already
            self._pending.discard(kind)
            done = not self._pending
        if done:
            self.sink.synced(self.name)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()


def _since(start: float, end: float | None = None) -> float:
    return round((end if end is not None else time.monotonic()) - start, 3)
