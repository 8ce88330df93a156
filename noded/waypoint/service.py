"""The waypoint in the daemon: which connections it takes, and what the proxy asks of the node.

`target(ip, port)` says whether a cluster IP:port is an HTTP port of a Service that uses a waypoint (the
client's node then sends the connection over HBONE naming that VIP:port, and the destination pod's 15008
hands it here). `accept(ctx)` serves one such connection: the HBONE stream is spliced to one end of a
socket pair, the HTTP/1.1 proxy (http1.py) reads the other. For each request the proxy asks `authorize`
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
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from noded.tunnel.policy import Connection, Request
from noded.tunnel.relay import spawn
from noded.waypoint import telemetry as request_telemetry
from noded.waypoint.http1 import Context, Decision, Proxy, RequestRecord, Upstream
from noded.waypoint.registry import HTTP, Registry, Waypoint
from noded.waypoint.routes import choose

log = structlog.get_logger("noded.waypoint")
MAX_CONNECTIONS = 4096  # client connections through this node's waypoint at once; past it, refused


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

    dial: Callable[[str | None, tuple[str, int]], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class WaypointService(Upstream):
    def __init__(self, tunnel, registry: Registry) -> None:
        self.tunnel = tunnel  # noded/tunnel/node.py Tunnel: model, enrollment, policies, identities
        self.registry = registry
        self.proxy = Proxy(self, self._recorded)
        self.telemetry = request_telemetry.RequestTelemetry()
        self.tasks: set[asyncio.Task] = set()
        self.counts = {"connections": 0, "refused": 0, "requests": 0, "denied": 0}

    # -- which connections -----------------------------------------------------------------------
    def target(self, ip: str, port: int) -> Target | None:
        state = self.tunnel.model.cluster_frontend(ip, port)
        if state is None:
            return None
        name = state.service.name
        waypoint = self.registry.waypoint_of(name.namespace, name.name)
        if waypoint is None or self.registry.protocol_of(name.namespace, name.name, port, name.port) != HTTP:
            return None  # TCP, HTTP/2 and gRPC ports stay on the L4 path
        return Target(waypoint, name.namespace, name.name, port, ip)

    def identity(self, waypoint: Waypoint) -> str:
        return waypoint.identity(self.tunnel.trust_domain)

    def accept(self, target: Target, client_ip: str, identity: str | None, origin: Origin) -> socket.socket:
        """One end of a socket pair for the HBONE stream; the proxy serves the other."""
        ours, theirs = socket.socketpair()
        for s in (ours, theirs):
            s.setblocking(False)
        if self.proxy.active >= MAX_CONNECTIONS:
            self.counts["refused"] += 1
            ours.close()
            return theirs  # closed at once on our side: the client sees the stream end
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
        spawn(self.tasks, self._serve(ours, ctx))
        return theirs

    async def _serve(self, sock: socket.socket, ctx: Context) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        await self.proxy.serve(reader, writer, ctx)

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
        for vip in self.tunnel.model.cluster_ips(namespace, name):
            state = self.tunnel.model.cluster_frontend(vip, port)
            if state is None:
                continue
            backends = state.ready or state.terminating
            if backends:
                decision.address = random.choice(backends)
                return decision
        decision.status, decision.body = 503, "no healthy upstream"
        return decision

    async def connect(
        self, ctx: Context, address: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        waypoint = Waypoint(ctx.namespace, ctx.waypoint)
        return await ctx.origin.dial(self.identity(waypoint), address)

    # -- telemetry -------------------------------------------------------------------------------
    def _recorded(self, record: RequestRecord) -> None:
        self.counts["requests"] += 1
        tunnel = self.tunnel
        ctx = record.ctx
        source = tunnel.workload_at(ctx.client_ip)
        if ctx.principal:
            source = dataclasses.replace(source, principal=f"spiffe://{ctx.principal}")
        address = record.address
        destination = tunnel.workload_at(address[0]) if address else request_telemetry.Workload()
        service = (
            tuple(reversed(record.backend.split(":")[0].split("/"))) if record.backend else (ctx.service, ctx.namespace)
        )
        labels = request_telemetry.key(
            source, destination, service, record.status, record.flags, ctx.principal is not None
        )
        self.telemetry.record(labels, record.duration_ms, record.request_bytes, record.response_bytes)
        request_telemetry.log.info(
            "request",
            method=record.method,
            authority=record.authority,
            path=record.path[:512],
            response_code=record.status,
            duration_ms=round(record.duration_ms, 2),
            request_id=record.request_id,
            source=source.principal,
            source_address=ctx.client_ip,
            destination_service=record.backend or f"{ctx.namespace}/{ctx.service}:{ctx.port}",
            destination=destination.principal,
            upstream=f"{address[0]}:{address[1]}" if address else None,
            route=record.route,
            policy=record.policy,
            flags=record.flags,
            attempts=record.attempts,
        )

    def status(self) -> dict:
        return {**self.registry.status(), **self.counts, "active": self.proxy.active}
