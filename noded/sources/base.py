"""What a source feeds: the sink protocol, object keys, and the diff a relist applies."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any, Protocol

WATCHED_KINDS = ("Service", "EndpointSlice", "Pod", "Namespace", "Node", "AuthorizationPolicy", "Gateway", "HTTPRoute")

ObjectKey = tuple[str, str, str]  # (kind, namespace, name)


class Sink(Protocol):
    def upsert(self, obj: dict) -> bool: ...

    def delete(self, kind: str, namespace: str, name: str) -> None: ...

    def synced(self, source: str) -> None: ...


class Source(Protocol):
    """What the daemon runs: a source of objects feeding a sink from its own threads."""

    name: str

    @property
    def synced(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Ahead:
    """A call made now on a thread of its own, its result (or what it raised) taken later: the next page of
    a list on its way while this one is applied, a source started while the daemon sets up the rest. A daemon
    thread, not an executor's worker, which the interpreter joins at exit: a stopping noded never waits out a
    request's 60 s timeout."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True).start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to whoever takes the result, as if the call were theirs
            self._error = e
        finally:
            self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def object_key(obj: Any) -> ObjectKey | None:
    """(kind, namespace, name) of a well-formed object; None when it cannot be keyed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        return None
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    kind = obj["kind"]
    namespace = meta.get("namespace")
    if kind in ("Namespace", "Node"):
        namespace = ""  # cluster-scoped
    elif not isinstance(namespace, str) or not namespace:
        namespace = "default"
    return kind, namespace, meta["name"]


def fingerprint(obj: dict) -> bytes:
    """A 16-byte digest standing in for an object: sources remember these, not whole objects."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).digest()


def api_fingerprint(obj: dict) -> bytes:
    """An API object's fingerprint from its uid and resourceVersion, which the API server changes with every
    change (what client-go's informers compare): no serialising of the whole object, a fifth of a list's
    cost. An object without them (a manifest file) is digested whole."""
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    if not rv or not isinstance(rv, str):
        return fingerprint(obj)
    return hashlib.blake2b(f"{meta.get('uid')}/{rv}".encode(), digest_size=16).digest()


def apply_snapshot(
    sink: Sink,
    known: dict[ObjectKey, bytes],
    fresh: dict[ObjectKey, dict],
    digest: Callable[[dict], bytes] = fingerprint,
) -> dict[ObjectKey, bytes]:
    """Make the sink see `fresh` where it saw `known` (deletes, then changed and new objects).

    Returns the fingerprints (by `digest`) to remember.
    """
    prints = {key: digest(obj) for key, obj in fresh.items()}
    for key in known.keys() - fresh.keys():
        sink.delete(*key)
    for key, obj in fresh.items():
        if known.get(key) != prints[key]:
            sink.upsert(obj)
    return prints
