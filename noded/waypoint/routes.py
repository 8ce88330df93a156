"""Gateway API HTTPRoute (gateway.networking.k8s.io/v1) attached to a Service (GAMMA), parsed and matched. Pure.

A route attaches through `parentRefs` of kind Service (group ""), optionally naming a port. Its rules match
on path (Exact, PathPrefix by whole segments, RegularExpression), headers (Exact, RegularExpression; names
case-insensitive), method and query parameters; the most specific match wins by the Gateway API's order
(exact path, longest prefix, method, most headers, most query parameters, then the oldest route, then
namespace/name, then rule order). A rule sends to weighted `backendRefs` (Services with a port), applies
RequestHeaderModifier and ResponseHeaderModifier filters, a `timeouts.request`, and `retry` (attempts and
codes); without `retry` the waypoint retries as Istio's default does: twice, on a connect failure or 503.
Anything malformed or unsupported raises RouteError naming the field: the route is rejected alone.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

GROUP = "gateway.networking.k8s.io"
DEFAULT_RETRIES = 2  # Istio's default retry policy: 2 attempts on connect-failure, refused-stream, 503
DEFAULT_RETRY_CODES = (503,)
MAX_WEIGHT = 1_000_000
_DURATION = re.compile(r"(?:([0-9]{1,5})(h|ms|m|s))")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}")
_RULE_KEYS = {"name", "matches", "filters", "backendRefs", "timeouts", "retry"}
FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")


class RouteError(ValueError):
    """A malformed or unsupported HTTPRoute; the message names the field."""


@dataclass(frozen=True)
class HeaderChanges:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The headers (name, value) with the changes made; names compared case-insensitively."""
        if not (self.set or self.add or self.remove):
            return headers
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        return out + list(self.set) + list(self.add)


@dataclass(frozen=True)
class Match:
    path_type: str = "PathPrefix"
    path: str = "/"
    headers: tuple[tuple[str, str, str], ...] = ()  # (type, lowercased name, value or pattern)
    method: str | None = None
    query: tuple[tuple[str, str, str], ...] = ()  # (type, name, value or pattern)

    def matches(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> bool:
        if self.path_type == "Exact":
            if path != self.path:
                return False
        elif self.path_type == "PathPrefix":
            prefix = self.path.rstrip("/")
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                return False
        elif not re.fullmatch(self.path, path):
            return False
        if self.method is not None and method != self.method:
            return False
        return _values_match(self.headers, headers) and _values_match(self.query, query)

    def precedence(self) -> tuple:
        """Bigger is more specific (the Gateway API's order)."""
        exact = self.path_type == "Exact"
        prefix_len = len(self.path) if self.path_type == "PathPrefix" else 0
        return (exact, prefix_len, self.method is not None, len(self.headers), len(self.query))


def _values_match(conditions: tuple[tuple[str, str, str], ...], values: dict[str, str]) -> bool:
    """Every (type, name, value or pattern) condition holds for the request's values."""
    for kind, name, value in conditions:
        got = values.get(name)
        if got is None or (got != value if kind == "Exact" else not re.fullmatch(value, got)):
            return False
    return True


@dataclass(frozen=True)
class Backend:
    namespace: str
    name: str
    port: int
    weight: int


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    backends: tuple[Backend, ...]
    request_headers: HeaderChanges = HeaderChanges()
    response_headers: HeaderChanges = HeaderChanges()
    timeout: float | None = None  # seconds; None: no limit but the waypoint's own
    retries: int = DEFAULT_RETRIES
    retry_codes: tuple[int, ...] = DEFAULT_RETRY_CODES

    def pick(self, rng: random.Random = random._inst) -> Backend | None:  # type: ignore[attr-defined]
        """A backend by weight; None when every weight is 0 (the Gateway API answers 500 then)."""
        total = sum(b.weight for b in self.backends)
        if total <= 0:
            return None
        n = rng.randrange(total)
        for b in self.backends:
            n -= b.weight
            if n < 0:
                return b
        return None  # unreachable


@dataclass(frozen=True)
class HTTPRoute:
    namespace: str
    name: str
    parents: tuple[tuple[str, str, int | None], ...]  # (namespace, Service name, port or None: every port)
    rules: tuple[Rule, ...]
    created: str = ""  # metadata.creationTimestamp: the older route wins a tie

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Choice:
    """What a request gets: the rule (None: no route attached, the Service itself) or a status to answer."""

    rule: Rule | None = None
    route: str | None = None
    status: int = 0  # 404: routes attached and none matches
    extra: dict = field(default_factory=dict)


def parse_duration(text: object, at: str) -> float:
    """A Gateway API duration ("10s", "1m30s", "500ms"; "0s": no limit) in seconds."""
    if not isinstance(text, str) or not text:
        raise RouteError(f"{at}: expected a duration such as 10s or 500ms")
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text or len(parts) > 4:
        raise RouteError(f"{at}: {text!r} is not a duration such as 10s or 500ms")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * scale[u] for n, u in parts)


def _map(value: object, at: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RouteError(f"{at}: expected a mapping")
    return value


def _list(value: object, at: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RouteError(f"{at}: expected a list")
    return value


def _str(value: object, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise RouteError(f"{at}: expected a non-empty string")
    return value


def _regex(value: str, at: str) -> str:
    if len(value) > 1024:
        raise RouteError(f"{at}: pattern longer than 1024 characters")
    try:
        re.compile(value)
    except re.error as e:
        raise RouteError(f"{at}: {value!r} is not a regular expression: {e}") from None
    return value


def _port(value: object, at: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise RouteError(f"{at}: expected a port number")
    return value


def _header_name(value: object, at: str) -> str:
    name = _str(value, at)
    if not _HEADER_NAME.fullmatch(name):
        raise RouteError(f"{at}: {name!r} is not an HTTP header name")
    return name


def _header_value(value: object, at: str) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\0") or len(value) > 4096:
        raise RouteError(f"{at}: expected a header value (no CR, LF or NUL, at most 4096 characters)")
    return value


def _match(raw: dict, at: str) -> Match:
    unknown = set(raw) - {"path", "headers", "method", "queryParams"}
    if unknown:
        raise RouteError(f"{at}.{sorted(unknown)[0]}: unknown field")
    path = _map(raw.get("path"), f"{at}.path")
    path_type = path.get("type", "PathPrefix")
    if path_type not in ("Exact", "PathPrefix", "RegularExpression"):
        raise RouteError(f"{at}.path.type: {path_type!r} is not Exact, PathPrefix or RegularExpression")
    value = path.get("value", "/")
    if not isinstance(value, str) or (path_type != "RegularExpression" and not value.startswith("/")):
        raise RouteError(f"{at}.path.value: expected a path starting with /")
    if path_type == "RegularExpression":
        _regex(value, f"{at}.path.value")
    headers = _value_matches(raw.get("headers"), f"{at}.headers", lambda v, w: _header_name(v, w).lower())
    method = raw.get("method")
    if method is not None and method not in (
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "DELETE",
        "CONNECT",
        "OPTIONS",
        "TRACE",
        "PATCH",
    ):
        raise RouteError(f"{at}.method: {method!r} is not an HTTP method")
    query = _value_matches(raw.get("queryParams"), f"{at}.queryParams", _str)
    return Match(path_type, value, headers, method, query)


def _value_matches(raw: object, at: str, name_of: Callable[[object, str], str]) -> tuple[tuple[str, str, str], ...]:
    """Header or query parameter matches: (type, name as `name_of` reads it, value or pattern)."""
    out = []
    for i, item in enumerate(_list(raw, at)):
        item = _map(item, f"{at}[{i}]")
        kind = item.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            raise RouteError(f"{at}[{i}].type: {kind!r} is not Exact or RegularExpression")
        name = name_of(item.get("name"), f"{at}[{i}].name")
        val = _header_value(item.get("value"), f"{at}[{i}].value")
        out.append((kind, name, _regex(val, f"{at}[{i}].value") if kind != "Exact" else val))
    return tuple(out)


def _changes(raw: dict, at: str) -> HeaderChanges:
    unknown = set(raw) - {"set", "add", "remove"}
    if unknown:
        raise RouteError(f"{at}.{sorted(unknown)[0]}: unknown field")
    pairs = {}
    for verb in ("set", "add"):
        out = []
        for i, h in enumerate(_list(raw.get(verb), f"{at}.{verb}")):
            h = _map(h, f"{at}.{verb}[{i}]")
            out.append(
                (
                    _header_name(h.get("name"), f"{at}.{verb}[{i}].name"),
                    _header_value(h.get("value"), f"{at}.{verb}[{i}].value"),
                )
            )
        pairs[verb] = tuple(out)
    remove = tuple(_header_name(n, f"{at}.remove[{i}]") for i, n in enumerate(_list(raw.get("remove"), f"{at}.remove")))
    return HeaderChanges(pairs["set"], pairs["add"], remove)


def _rule(raw: dict, namespace: str, at: str) -> Rule:
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise RouteError(f"{at}.{sorted(unknown)[0]}: unsupported field")
    matches = tuple(
        _match(_map(m, f"{at}.matches[{i}]"), f"{at}.matches[{i}]")
        for i, m in enumerate(_list(raw.get("matches"), f"{at}.matches"))
    )
    backends = []
    for i, b in enumerate(_list(raw.get("backendRefs"), f"{at}.backendRefs")):
        where = f"{at}.backendRefs[{i}]"
        b = _map(b, where)
        if b.get("group", "") not in ("", "core") or b.get("kind", "Service") != "Service":
            raise RouteError(f"{where}: only Services are supported backends")
        if b.get("filters"):
            raise RouteError(f"{where}.filters: unsupported field")
        weight = b.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
            raise RouteError(f"{where}.weight: expected an integer from 0 to {MAX_WEIGHT}")
        ns = b.get("namespace", namespace)
        if ns != namespace:
            raise RouteError(f"{where}.namespace: another namespace needs a ReferenceGrant, which is not supported")
        backends.append(
            Backend(namespace, _str(b.get("name"), f"{where}.name"), _port(b.get("port"), f"{where}.port"), weight)
        )
    request, response = HeaderChanges(), HeaderChanges()
    for i, flt in enumerate(_list(raw.get("filters"), f"{at}.filters")):
        where = f"{at}.filters[{i}]"
        flt = _map(flt, where)
        kind = flt.get("type")
        if kind not in FILTERS:
            raise RouteError(f"{where}.type: {kind!r} is not supported (supported: {', '.join(FILTERS)})")
        spec = _map(flt.get(kind[0].lower() + kind[1:]), f"{where}.{kind[0].lower() + kind[1:]}")
        if kind == "RequestHeaderModifier":
            request = _changes(spec, f"{where}.requestHeaderModifier")
        else:
            response = _changes(spec, f"{where}.responseHeaderModifier")
    timeouts = _map(raw.get("timeouts"), f"{at}.timeouts")
    unknown = set(timeouts) - {"request", "backendRequest"}
    if unknown:
        raise RouteError(f"{at}.timeouts.{sorted(unknown)[0]}: unknown field")
    timeout = parse_duration(timeouts["request"], f"{at}.timeouts.request") if "request" in timeouts else None
    retries, codes = DEFAULT_RETRIES, DEFAULT_RETRY_CODES
    if "retry" in raw:
        retry = _map(raw["retry"], f"{at}.retry")
        attempts = retry.get("attempts", DEFAULT_RETRIES)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or not 0 <= attempts <= 10:
            raise RouteError(f"{at}.retry.attempts: expected an integer from 0 to 10")
        raw_codes = _list(retry.get("codes", list(DEFAULT_RETRY_CODES)), f"{at}.retry.codes")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 400 <= c <= 599 for c in raw_codes):
            raise RouteError(f"{at}.retry.codes: expected HTTP status codes from 400 to 599")
        retries, codes = attempts, tuple(raw_codes)
    return Rule(matches or (Match(),), tuple(backends), request, response, timeout or None, retries, codes)


def parse_route(obj: dict) -> HTTPRoute:
    meta = _map(obj.get("metadata"), "metadata")
    name = _str(meta.get("name"), "metadata.name")
    namespace = meta.get("namespace") or "default"
    spec = _map(obj.get("spec"), "spec")
    parents = []
    for i, p in enumerate(_list(spec.get("parentRefs"), "spec.parentRefs")):
        p = _map(p, f"spec.parentRefs[{i}]")
        if p.get("kind") != "Service" or p.get("group", "") not in ("", "core"):
            raise RouteError(
                f'spec.parentRefs[{i}]: only a Service parent (group "", kind Service) is served by a waypoint'
            )
        ns = p.get("namespace", namespace)
        if ns != namespace:
            raise RouteError(f"spec.parentRefs[{i}].namespace: a Service of another namespace is not supported")
        port = _port(p["port"], f"spec.parentRefs[{i}].port") if p.get("port") is not None else None
        parents.append((namespace, _str(p.get("name"), f"spec.parentRefs[{i}].name"), port))
    if not parents:
        raise RouteError("spec.parentRefs: at least one Service parent is required")
    rules_raw = _list(spec.get("rules"), "spec.rules") or [{}]
    if len(rules_raw) > 64:
        raise RouteError("spec.rules: at most 64 rules")
    rules = tuple(_rule(_map(r, f"spec.rules[{i}]"), namespace, f"spec.rules[{i}]") for i, r in enumerate(rules_raw))
    created = meta.get("creationTimestamp") if isinstance(meta.get("creationTimestamp"), str) else ""
    return HTTPRoute(namespace, name, tuple(parents), rules, created)


def route_order(route: HTTPRoute) -> tuple[str, str, str]:
    """The Gateway API's tie order: the older route first (by creationTimestamp), then namespace/name."""
    return (route.created or "~", route.namespace, route.name)


def choose(routes: list[HTTPRoute], method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> Choice:
    """The rule a request gets among the routes attached to its Service and port (`headers` lowercased)."""
    if not routes:
        return Choice()
    best, best_key = None, None
    ordered = routes if len(routes) < 2 else sorted(routes, key=route_order)
    for rank, route in enumerate(ordered):
        for index, rule in enumerate(route.rules):
            for m in rule.matches:
                if m.matches(method, path, query, headers):
                    key = (m.precedence(), -rank, -index)
                    if best_key is None or key > best_key:
                        best, best_key = (rule, route.key), key
    if best is None:
        return Choice(status=404)
    return Choice(rule=best[0], route=best[1])
