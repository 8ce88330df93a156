"""Istio AuthorizationPolicy (security.istio.io/v1, v1beta1) at L4, as ztunnel enforces it. Pure.

A policy in the root namespace (`istio-system`) applies to every workload; elsewhere to the workloads
of its namespace that its `selector.matchLabels` selects (all of them without a selector). Evaluation:
a matching DENY policy denies; else, with no ALLOW policy for the workload, the connection is allowed;
else it is allowed only if an ALLOW policy matches. A rule matches when one of its `from` sources, one
of its `to` operations and all its `when` conditions match (a missing part matches anything); inside a
source or operation every field set must match, any of its values. `principals` and `namespaces` take
Istio's prefix/suffix `*`. L7 attributes cannot be seen at L4: as in ztunnel, a rule using them never
matches in an ALLOW policy and its L4 part alone decides in a DENY policy (failing closed both ways).
A malformed policy fails closed, as Istio makes it: its error is kept (`PolicyError` names the field) and
what stands in force in its place is a DENY that denies everything, for a bad DENY (or an action that
cannot be read), or an ALLOW that allows nothing, for a bad ALLOW; a selector that cannot be read selects
every workload of the namespace. The other policies keep applying. No input makes the parser raise
anything but PolicyError, and a policy's values are checked when it is parsed, never when a connection
is decided.

Policies with `targetRefs` (a waypoint's Gateway, or a Service) are the waypoint's, as in ambient: the L4
check leaves them out, and `check_waypoint` applies them to each request with its L7 attributes
(`to.operation` hosts, methods, paths and ports; `when` on `request.headers[...]`; `from.source`
principals and namespaces of the client the tunnel verified). Request principals (JWT) are never present,
and conditions noded cannot evaluate keep failing closed there too. A targeted policy whose targets cannot
be read stands for every waypoint request of its namespace.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

ROOT_NAMESPACE = "istio-system"
API_GROUP = "security.istio.io"
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
SOURCE_L4 = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals")
OPERATION_L4 = ("ports", "notPorts")
OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
WHEN_L4 = ("source.ip", "source.namespace", "source.principal", "destination.port", "destination.ip", "remote.ip")
WHEN_HEADER = "request.headers["
ANY_TARGET = ("*", "*")  # a targeted policy whose targets cannot be read: every waypoint request of its namespace
GATEWAY_GROUP = "gateway.networking.k8s.io"
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() takes "²", which int() refuses


class PolicyError(ValueError):
    """A malformed AuthorizationPolicy; the message names the field."""


@dataclass(frozen=True)
class Request:
    """What the waypoint knows of one HTTP request."""

    method: str
    host: str  # the Host header (authority), as sent
    path: str  # without the query string, as Envoy's url_path
    headers: dict[str, str]  # lowercased names


@dataclass(frozen=True)
class Connection:
    """What the tunnel knows of a connection when it decides: the destination workload and the source."""

    namespace: str  # the destination workload's
    labels: dict[str, str]
    port: int
    source_ip: str
    destination_ip: str = ""
    principal: str | None = None  # "cluster.local/ns/NS/sa/SA" when the source is authenticated (HBONE)
    labels_known: bool = True  # False: the destination pod has not been seen yet (its labels are unknown)
    request: Request | None = None  # at the waypoint: the request's L7 attributes

    @property
    def source_namespace(self) -> str | None:
        parts = (self.principal or "").split("/")
        return parts[2] if len(parts) == 5 and parts[1] == "ns" else None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None  # namespace/name of the policy that decided; None: the default
    reason: str


NO_ALLOW_POLICY = Decision(True, None, "no ALLOW policy applies")  # the common answer, made once


@dataclass
class _Rule:
    sources: list[dict[str, list[str]]]  # each: field -> values (L4 ones)
    operations: list[dict[str, list[str]]]
    when: list[tuple[str, list[str], list[str]]]  # (key, values, notValues)
    l7: bool  # uses an attribute L4 cannot see
    unsupported: bool = False  # uses an attribute noded cannot see even at L7 (request.auth.*, ...)


@dataclass
class Policy:
    namespace: str
    name: str
    action: str
    selector: dict[str, str] | None
    rules: list[_Rule] = field(default_factory=list)
    targets: tuple[tuple[str, str], ...] = ()  # (kind, name): Gateway or Service; set: the waypoint's policy

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def applies_to(self, conn: Connection) -> bool:
        if self.targets:
            return False  # the waypoint's (check_waypoint), never the L4 check's
        if self.namespace != ROOT_NAMESPACE and self.namespace != conn.namespace:
            return False
        return all(conn.labels.get(k) == v for k, v in (self.selector or {}).items())

    def matches(self, conn: Connection) -> bool:
        return any(_rule_matches(rule, conn, self.action) for rule in self.rules)


_MATCH_ALL = _Rule([], [], [], False)


def fail_closed(obj: object) -> Policy:
    """What stands in for a policy that cannot be parsed: a DENY of everything (a bad DENY, or an action
    that cannot be read), an ALLOW of nothing (a bad ALLOW); AUDIT and CUSTOM decide nothing at L4."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) and meta.get("namespace") else "default"
    name = str(meta.get("name"))
    spec = obj.get("spec") if isinstance(obj, dict) and isinstance(obj.get("spec"), dict) else {}
    action = spec.get("action", "ALLOW")
    selector = None
    raw = spec.get("selector")
    labels = raw.get("matchLabels") if isinstance(raw, dict) else None
    if isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        selector = dict(labels)  # readable: the same workloads; otherwise every workload of the namespace
    targets: tuple[tuple[str, str], ...] = ()
    if "targetRefs" in spec or "targetRef" in spec:
        try:
            targets = _targets(spec)
        except PolicyError:
            targets = (ANY_TARGET,)
        selector = None
    if action == "ALLOW":
        return Policy(namespace, name, "ALLOW", selector, [], targets)  # present, matching nothing
    if action in ("AUDIT", "CUSTOM"):
        return Policy(namespace, name, action, selector, [], targets)
    return Policy(namespace, name, "DENY", selector, [_MATCH_ALL], targets)


def _targets(spec: dict) -> tuple[tuple[str, str], ...]:
    """`targetRefs` (or the older single `targetRef`): Gateways and Services of the policy's namespace."""
    raw = spec.get("targetRefs") if "targetRefs" in spec else [spec.get("targetRef")]
    out = []
    for i, ref in enumerate(_list(raw, "spec.targetRefs")):
        at = f"spec.targetRefs[{i}]"
        ref = _mapping(ref, at)
        kind, group, name = ref.get("kind"), ref.get("group", ""), ref.get("name")
        if not isinstance(name, str) or not name:
            raise PolicyError(f"{at}.name: required")
        if kind == "Gateway" and group == GATEWAY_GROUP:
            out.append(("Gateway", name))
        elif kind == "Service" and group in ("", "core"):
            out.append(("Service", name))
        else:
            raise PolicyError(f"{at}: {group or 'core'}/{kind} is not a target noded serves (Gateway or Service)")
    if not out:
        raise PolicyError("spec.targetRefs: at least one target")
    return tuple(out)


# -- parsing -----------------------------------------------------------------------------------
def _strings(value: object, at: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise PolicyError(f"{at}: expected a list of strings")
    return [str(v) for v in value]


def _mapping(value: object, at: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(f"{at}: expected a mapping")
    return value


def _list(value: object, at: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{at}: expected a list")
    return value


def _fields(raw: dict, l4: tuple[str, ...], l7: tuple[str, ...], at: str) -> tuple[dict[str, list[str]], bool]:
    out, uses_l7 = {}, False
    for key, value in raw.items():
        if key in l7:
            out[key] = _strings(value, f"{at}.{key}")
            uses_l7 = True
        elif key in l4:
            out[key] = _strings(value, f"{at}.{key}")
            if "IpBlocks" in key or key in ("ipBlocks", "remoteIpBlocks"):
                for i, cidr in enumerate(out[key]):
                    try:
                        ipaddress.ip_network(cidr, strict=False)
                    except ValueError:
                        raise PolicyError(f"{at}.{key}[{i}]: {cidr!r} is not an IP or CIDR") from None
            if key in ("ports", "notPorts"):
                for i, port in enumerate(out[key]):
                    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
                        raise PolicyError(f"{at}.{key}[{i}]: {port!r} is not a port")
        else:
            raise PolicyError(f"{at}.{key}: unknown field")
    return out, uses_l7


def _clauses(
    rule: dict, part: str, inner: str, l4: tuple[str, ...], l7: tuple[str, ...], at: str
) -> tuple[list[dict[str, list[str]]], bool]:
    """A rule's `from` sources or `to` operations: their L4 fields, and whether any uses an L7 one."""
    out, uses_l7 = [], False
    for j, item in enumerate(_list(rule.get(part), f"{at}.{part}")):
        where = f"{at}.{part}[{j}]"
        fields, uses = _fields(_mapping(_mapping(item, where).get(inner), inner), l4, l7, f"{where}.{inner}")
        out.append(fields)
        uses_l7 |= uses
    return out, uses_l7


def parse_policy(obj: dict) -> Policy:
    meta = _mapping(obj.get("metadata"), "metadata")
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        raise PolicyError("metadata.name: required")
    spec = _mapping(obj.get("spec"), "spec")
    action = spec.get("action", "ALLOW")
    if action not in ACTIONS:
        raise PolicyError(f"spec.action: {action!r} is not one of {', '.join(ACTIONS)}")
    selector = None
    if "selector" in spec:
        labels = _mapping(_mapping(spec["selector"], "spec.selector").get("matchLabels"), "spec.selector.matchLabels")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise PolicyError("spec.selector.matchLabels: expected string keys and values")
        selector = labels
    targets: tuple[tuple[str, str], ...] = ()
    if "targetRefs" in spec or "targetRef" in spec:
        if selector is not None:
            raise PolicyError("spec: selector and targetRefs cannot both be set")
        targets = _targets(spec)
    rules_raw = spec.get("rules", [])
    if not isinstance(rules_raw, list):
        raise PolicyError("spec.rules: expected a list")
    rules = []
    for i, raw in enumerate(rules_raw):
        at = f"spec.rules[{i}]"
        raw = _mapping(raw, at)
        unknown = set(raw) - {"from", "to", "when"}
        if unknown:
            raise PolicyError(f"{at}.{sorted(unknown)[0]}: unknown field")
        sources, source_l7 = _clauses(raw, "from", "source", SOURCE_L4, SOURCE_L7, at)
        operations, operation_l7 = _clauses(raw, "to", "operation", OPERATION_L4, OPERATION_L7, at)
        l7 = source_l7 or operation_l7
        source_jwt = any("requestPrincipals" in src for src in sources)  # no request is ever authenticated
        unsupported = False
        when = []
        for j, cond in enumerate(_list(raw.get("when"), f"{at}.when")):
            cond = _mapping(cond, f"{at}.when[{j}]")
            key = cond.get("key")
            if not isinstance(key, str) or not key:
                raise PolicyError(f"{at}.when[{j}].key: required")
            values = _strings(cond.get("values", []), f"{at}.when[{j}].values")
            not_values = _strings(cond.get("notValues", []), f"{at}.when[{j}].notValues")
            if key.endswith(".ip") and key in WHEN_L4:
                for what, listed in (("values", values), ("notValues", not_values)):
                    for n, cidr in enumerate(listed):
                        try:
                            ipaddress.ip_network(cidr, strict=False)
                        except ValueError:
                            raise PolicyError(f"{at}.when[{j}].{what}[{n}]: {cidr!r} is not an IP or CIDR") from None
            unsupported_key = False
            if key in WHEN_L4:
                when.append((key, values, not_values))
            elif key.startswith(WHEN_HEADER) and key.endswith("]") and len(key) > len(WHEN_HEADER) + 1:
                when.append((key, values, not_values))
                l7 = True
            else:
                l7 = unsupported_key = True  # request.auth.*, connection.sni, ...: noded never sees them
            unsupported = unsupported or unsupported_key
        rules.append(_Rule(sources, operations, when, l7, unsupported or source_jwt))
    return Policy(namespace, name, action, selector, rules, targets)


# -- matching ----------------------------------------------------------------------------------
def _glob(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _in_blocks(ip: str, blocks: list[str]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(b, strict=False) for b in blocks)


def _source_matches(src: dict[str, list[str]], conn: Connection) -> bool:
    checks = {
        "principals": lambda v: any(_glob(p, conn.principal) for p in v),
        "notPrincipals": lambda v: not any(_glob(p, conn.principal) for p in v),
        "namespaces": lambda v: any(_glob(p, conn.source_namespace) for p in v),
        "notNamespaces": lambda v: not any(_glob(p, conn.source_namespace) for p in v),
        "ipBlocks": lambda v: _in_blocks(conn.source_ip, v),
        "notIpBlocks": lambda v: not _in_blocks(conn.source_ip, v),
        "remoteIpBlocks": lambda v: _in_blocks(conn.source_ip, v),
        "notRemoteIpBlocks": lambda v: not _in_blocks(conn.source_ip, v),
    }
    # request principals: never known (no JWT is read); the rule is marked unsupported instead
    return all(checks[key](values) for key, values in src.items() if key in checks)


def _host_matches(patterns: list[str], host: str) -> bool:
    host = host.lower()
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 or "]:" in host else host  # the port taken off
    return any(_glob(p.lower(), host) or _glob(p.lower(), bare) for p in patterns)


def _operation_matches(op: dict[str, list[str]], conn: Connection) -> bool:
    if "ports" in op and str(conn.port) not in op["ports"]:
        return False
    if "notPorts" in op and str(conn.port) in op["notPorts"]:
        return False
    request = conn.request
    if request is None:
        return True  # L4: the L7 fields are not seen (the rule's l7 flag decides what that means)
    checks = {
        "hosts": lambda v: _host_matches(v, request.host),
        "notHosts": lambda v: not _host_matches(v, request.host),
        "methods": lambda v: any(_glob(p, request.method) for p in v),
        "notMethods": lambda v: not any(_glob(p, request.method) for p in v),
        "paths": lambda v: any(_glob(p, request.path) for p in v),
        "notPaths": lambda v: not any(_glob(p, request.path) for p in v),
    }
    return all(checks[key](values) for key, values in op.items() if key in checks)


def _when_value(key: str, conn: Connection) -> str | None:
    if key.startswith(WHEN_HEADER):
        return conn.request.headers.get(key[len(WHEN_HEADER) : -1].lower()) if conn.request else None
    return {
        "source.ip": conn.source_ip,
        "remote.ip": conn.source_ip,
        "source.namespace": conn.source_namespace,
        "source.principal": conn.principal,
        "destination.port": str(conn.port),
        "destination.ip": conn.destination_ip,
    }[key]


def _when_matches(key: str, values: list[str], not_values: list[str], conn: Connection) -> bool:
    if conn.request is None and key.startswith(WHEN_HEADER):
        return True  # L4: not seen (the rule's l7 flag decides what that means)
    value = _when_value(key, conn)
    is_ip = key.endswith(".ip")

    def hit(patterns: list[str]) -> bool:
        return _in_blocks(value or "", patterns) if is_ip else any(_glob(p, value) for p in patterns)

    return (not values or hit(values)) and not (not_values and hit(not_values))


def _rule_matches(rule: _Rule, conn: Connection, action: str) -> bool:
    seen = not rule.unsupported and (conn.request is not None or not rule.l7)
    if not seen and action != "DENY":
        return False  # an ALLOW (or AUDIT) rule that cannot be checked in full never matches
    # a DENY rule: what can be checked decides (failing closed)
    if rule.sources and not any(_source_matches(s, conn) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_matches(o, conn) for o in rule.operations):
        return False
    return all(_when_matches(k, v, nv, conn) for k, v, nv in rule.when)


class Authorizer:
    """The policies in force, and the decision for a connection."""

    def __init__(self) -> None:
        self.policies: dict[str, Policy] = {}
        self.rejected: dict[str, str] = {}  # namespace/name -> why
        self.generation = 0  # bumped on every change: the waypoint's per-target lists follow it
        self._targeted: dict[tuple[str, str, str], list[Policy]] = {}
        self._targeted_generation = -1

    def upsert(self, obj: dict) -> bool:
        """Parse and put in force; a policy that cannot be parsed is put in force failing closed (see
        fail_closed) and its error kept in `rejected`. Returns whether it parsed."""
        try:
            policy = parse_policy(obj)
        except Exception as e:  # PolicyError, or a parser bug: fail closed either way
            policy = fail_closed(obj)
            self.rejected[policy.key] = str(e) if isinstance(e, PolicyError) else f"{type(e).__name__}: {e}"
            self.policies[policy.key] = policy
            self.generation += 1
            return False
        self.rejected.pop(policy.key, None)
        self.policies[policy.key] = policy
        self.generation += 1
        return True

    def delete(self, namespace: str, name: str) -> None:
        self.generation += 1
        self.policies.pop(f"{namespace}/{name}", None)
        self.rejected.pop(f"{namespace}/{name}", None)

    def check(self, conn: Connection) -> Decision:
        if not conn.labels_known:
            selecting = [
                p.key
                for p in self.policies.values()
                if p.selector and p.namespace in (ROOT_NAMESPACE, conn.namespace) and p.action in ("ALLOW", "DENY")
            ]
            if selecting:  # unknown means deny for a workload policies may select
                return Decision(False, selecting[0], "the destination's labels are not known yet")
        return _decide([p for p in self.policies.values() if p.applies_to(conn)], conn)

    def check_waypoint(self, conn: Connection, waypoint: str, service: str) -> Decision:
        """A request at the waypoint `waypoint` (its Gateway's name) for the Service `service`, both in
        conn.namespace: the policies targeting either (or a targeted policy that could not be read)."""
        key = (conn.namespace, waypoint, service)
        generation = self.generation  # read first: a change while the list is made makes it stale at once
        if self._targeted_generation != generation or len(self._targeted) > 4096:
            self._targeted.clear()
            self._targeted_generation = generation
        applicable = self._targeted.get(key)
        if applicable is None:
            wanted = {("Gateway", waypoint), ("Service", service), ANY_TARGET}
            applicable = self._targeted[key] = [
                p
                for p in list(self.policies.values())
                if p.targets and p.namespace == conn.namespace and wanted & set(p.targets)
            ]
        return _decide(applicable, conn)


def _decide(applicable: list[Policy], conn: Connection) -> Decision:
    """Istio's order: a matching DENY denies; with no ALLOW the default allows; else an ALLOW must match."""
    for p in applicable:
        if p.action == "DENY" and p.matches(conn):
            return Decision(False, p.key, "denied by a DENY policy")
    allows = [p for p in applicable if p.action == "ALLOW"]
    if not allows:
        return NO_ALLOW_POLICY
    for p in allows:
        if p.matches(conn):
            return Decision(True, p.key, "allowed by an ALLOW policy")
    return Decision(False, None, "no ALLOW policy matches")
