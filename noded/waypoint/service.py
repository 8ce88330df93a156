"""The waypoint in the daemon: which connections it takes, and what the proxy asks of the node.

`target(ip, port)` says whether a cluster IP:port is an HTTP port of a Service that uses a waypoint (the
client's node then sends the connection over HBONE naming that VIP:port, and the destination pod's 15008
hands it here). `accept(...)` serves one such connection: the HBONE stream is attached in-process to the
HTTP/1.1 proxy's protocol (http1.py), no socket in between. For each request the proxy asks `authorize`
(the AuthorizationPolicies targeting the waypoint's Gateway or the Service, with the L7 request and the
client's verified identity; unknown policies deny), `route` (the HTTPRoutes attached to the Service, else
the Service itself; an endpoint of the chosen backend Service, ready ones first) and `connect` (the
context's `origin` dials the backend from the pod that accepted the connection: HBONE with the waypoint's
identity to a meshed backend, plain TCP to another). Every request ends in one access log line and the
request metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from noded.observe import LOG_FORMAT
from noded.tunnel.h2conn import InProcess
from noded.tunnel.policy import Connection, Request
from noded.waypoint import telemetry as request_telemetry
from noded.waypoint.http1 import Context, Decision, Proxy, RequestRecord, Upstream
from noded.waypoint.registry import TCP, Registry, Waypoint
from noded.waypoint.routes import choose

log = structlog.get_logger("noded.waypoint")
MAX_CONNECTIONS = 4096  # client connections through this node's waypoint at once; past it, refused
WORKLOAD_CACHE_SECONDS = 5.0
WORKLOAD_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Target:
    waypoint: Waypoint
    namespace: str
    service: str
    port: int
    vip: str


@dataclass
class Origin:
    """How backends are reached from the pod whose listener accepted the connection."""

    dial: Callable[
        [str | None, tuple[str, int], Callable[[], asyncio.Protocol]],
        Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]],
    ]  # (identity, backend address, protocol factory), as loop.create_connection


class WaypointService(Upstream):
    def __init__(self, tunnel, registry: Registry) -> None:
        self.tunnel = tunnel  # noded/tunnel/node.py Tunnel: model, enrollment, policies, identities
        self.registry = registry
        self.proxy = Proxy(self, self._recorded)
        self.telemetry = request_telemetry.RequestTelemetry()
        self.counts = {"connections": 0, "refused": 0, "requests": 0, "denied": 0}
        self.access_log = request_telemetry.AccessLog(LOG_FORMAT["json"])
        self._per_request: dict[tuple, tuple] = {}  # a request's labels and identities, by what makes them
        self._facts_since = 0.0
        self._backends: dict[tuple[str, str, int], tuple] = {}  # (ns, name, port) -> endpoints, per model generation
        self._backends_generation = -1

    # -- which connections -----------------------------------------------------------------------
    def target(self, ip: str, port: int) -> Target | None:
        """Through which waypoint a cluster IP:port goes (a Service's name and port, no endpoint chosen)."""
        service_port = self.tunnel.model.cluster_port(ip, port)
        if service_port is None:
            return None
        name = service_port.name
        waypoint = self.registry.waypoint_of(name.namespace, name.name)
        if waypoint is None or self.registry.protocol_of(name.namespace, name.name, port, name.port) == TCP:
            return None  # TCP ports stay on the L4 path
        return Target(waypoint, name.namespace, name.name, port, ip)

    def identity(self, waypoint: Waypoint) -> str:
        return waypoint.identity(self.tunnel.trust_domain)

    def accept(self, target: Target, client_ip: str, identity: str | None, origin: Origin) -> InProcess | None:
        """The proxy's side of one client connection, for the HBONE stream to attach in-process; None when
        this node's waypoint is at its connection limit (the stream is refused)."""
        if self.proxy.active >= MAX_CONNECTIONS:
            self.counts["refused"] += 1
            return None
        self.counts["connections"] += 1
        principal = identity.removeprefix("spiffe://") if identity else None
        ctx = Context(
            client_ip,
            principal,
            target.namespace,
            target.service,
            target.port,
            target.waypoint.name,
            target.vip,
            origin,
        )
        return InProcess(self.proxy.protocol(ctx))

    # -- what the proxy asks ---------------------------------------------------------------------
    def authorize(self, ctx: Context, request: Request) -> tuple[bool, str | None]:
        if not self.tunnel.policies_ready():
            return False, None  # policies never listed: unknown policy means deny
        conn = Connection(ctx.namespace, {}, ctx.port, ctx.client_ip, ctx.vip, ctx.principal, True, request)
        decision = self.tunnel.authorizer.check_waypoint(conn, ctx.waypoint, ctx.service)
        if not decision.allowed:
            self.counts["denied"] += 1
        return decision.allowed, decision.policy

    def route(self, ctx: Context, request: Request, query: dict[str, str]) -> Decision:
        routes = self.registry.routes_for(ctx.namespace, ctx.service, ctx.port)
        choice = choose(routes, request.method, request.path, query, request.headers)
        if choice.status:
            return Decision(status=choice.status, body="", route=None)
        if choice.rule is None:  # no route: the Service itself
            return self._to_service(ctx.namespace, ctx.service, ctx.port, Decision(retries=2, retry_codes=(503,)))
        rule = choice.rule
        decision = Decision(
            request_headers=rule.request_headers.apply,
            response_headers=rule.response_headers.apply,
            timeout=rule.timeout,
            retries=rule.retries,
            retry_codes=rule.retry_codes,
            route=choice.route,
        )
        if not rule.backends:
            return self._to_service(ctx.namespace, ctx.service, ctx.port, decision)
        backend = rule.pick()
        if backend is None:
            return dataclasses.replace(decision, status=500, body="no backend with weight")
        return self._to_service(backend.namespace, backend.name, backend.port, decision)

    def _to_service(self, namespace: str, name: str, port: int, decision: Decision) -> Decision:
        decision.backend = f"{namespace}/{name}:{port}"
        backends = self._endpoints(namespace, name, port)
        if backends:
            decision.address = random.choice(backends)
        else:
            decision.status, decision.body = 503, "no healthy upstream"
        return decision

    def _endpoints(self, namespace: str, name: str, port: int) -> tuple:
        """A Service port's endpoints (ready ones, else serving-terminating), kept while the model is unchanged."""
        model = self.tunnel.model
        if self._backends_generation != model.generation or len(self._backends) > WORKLOAD_CACHE_SIZE:
            self._backends.clear()
            self._backends_generation = model.generation
        key = (namespace, name, port)
        found = self._backends.get(key)
        if found is None:
            found = ()
            for vip in model.cluster_ips(namespace, name):
                state = model.cluster_frontend(vip, port)
                if state is not None and (state.ready or state.terminating):
                    found = state.ready or state.terminating
                    break
            self._backends[key] = found
        return found

    async def open(
        self, ctx: Context, address: tuple[str, int], factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        waypoint = Waypoint(ctx.namespace, ctx.waypoint)
        return await ctx.origin.dial(self.identity(waypoint), address, factory)

    # -- telemetry -------------------------------------------------------------------------------
    def _recorded(self, record: RequestRecord) -> None:
        self.counts["requests"] += 1
        ctx = record.ctx
        address = record.address
        backend = record.backend or f"{ctx.namespace}/{ctx.service}:{ctx.port}"
        # what a request's labels and identities depend on, all strings: cheap to hash
        key = (ctx.client_ip, ctx.principal, address, backend, record.status, record.flags, record.grpc_status)
        now = time.monotonic()
        if now - self._facts_since > WORKLOAD_CACHE_SECONDS or len(self._per_request) > WORKLOAD_CACHE_SIZE:
            self._per_request.clear()
            self._facts_since = now
        found = self._per_request.get(key)
        if found is None:
            found = self._per_request[key] = self._request_facts(ctx, address, backend, record)
        labels, source, destination, upstream = found
        self.telemetry.record(labels, record.duration_ms, record.request_bytes, record.response_bytes)
        self.access_log.add(
            (  # request_telemetry.ACCESS_FIELDS
                record.attempts,
                record.authority,
                destination,
                backend,
                round(record.duration_ms, 2),
                record.flags,
                record.grpc_status,
                record.method,
                record.path[:512],
                record.policy,
                record.request_id,
                record.status,
                record.route,
                source,
                ctx.client_ip,
                upstream,
            )
        )

    def _request_facts(
        self, ctx: Context, address: tuple[str, int] | None, backend: str, record: RequestRecord
    ) -> tuple[tuple[str, ...], str, str, str | None]:
        """(metric labels, source principal, destination principal, upstream) of a request like `record`:
        asked once per such request in WORKLOAD_CACHE_SECONDS (pods change rarely; a request should not
        walk the enrollment)."""
        source = self.tunnel.workload_at(ctx.client_ip)
        if ctx.principal:
            source = dataclasses.replace(source, principal=f"spiffe://{ctx.principal}")
        destination = self.tunnel.workload_at(address[0]) if address else request_telemetry.Workload()
        namespace, _, rest = backend.partition("/")
        labels = request_telemetry.key(
            source,
            destination,
            (rest.rsplit(":", 1)[0], namespace),
            record.status,
            record.flags,
            ctx.principal is not None,
            record.grpc_status,
            "grpc" if record.grpc_status is not None else "http",
        )
        upstream = f"{address[0]}:{address[1]}" if address else None
        return labels, source.principal, destination.principal, upstream

    def status(self) -> dict:
        return {**self.registry.status(), **self.counts, "active": self.proxy.active}
