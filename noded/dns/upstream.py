"""The upstream resolvers noded forwards to: health, failover, a concurrency bound, no loops.

Upstreams are tried in their configured order, healthy ones first (resolv.conf semantics: the first is
the primary). As with CoreDNS's forward plugin, `max_fails` failures in a row mark one down and a probe
(`. IN NS`) every `probe_interval` brings it back when it answers. Identical questions in flight share one
upstream query. Beyond `max_concurrent` upstream queries a new one is refused (`Overloaded`).

Loops are found as CoreDNS's loop plugin finds them: `check_loops()` (at start, then every
`loop_check_interval`) sends each upstream a HINFO query for a random name under `noded-loop-check.` that
only this process knows; if that name comes back to noded's own listener (`is_loop`), the upstream
forwards to noded and is set aside. Nothing a client sends can trigger it: a client cannot know the
name (before, a query matching the ID and question of one in flight disabled an upstream for good, and
a pod flooding one question with every ID disabled them all). A set-aside upstream is checked again at
each round and used again once its probe no longer comes back. Upstreams that are noded's own listen
addresses are never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import structlog

from noded.metrics import DNS_BUCKETS, LatencyHistogram

log = structlog.get_logger("noded.dns.upstream")
UDP_PAYLOAD = 1232  # DNS flag day 2020: no fragmentation on any path
FlightKey = tuple[str, int, int, bool]
LOOP_ZONE = "noded-loop-check."


class Overloaded(Exception):
    """max_concurrent upstream queries are already in flight."""


@dataclass
class Upstream:
    host: str
    port: int = 53
    healthy: bool = True
    looping: bool = False
    own: bool = False  # one of noded's own listen addresses: never used
    fails: int = 0
    queries: int = 0
    errors: int = 0
    healthcheck_failures: int = 0  # probes of a down upstream that failed (CoreDNS forward's counter)
    last_error: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Upstreams:
    def __init__(
        self,
        addresses: list[tuple[str, int]],
        own: set[tuple[str, int]] = frozenset(),  # type: ignore[assignment]
        max_concurrent: int = 1000,
        timeout: float = 1.5,
        max_fails: int = 2,
        probe_interval: float = 0.5,
        loop_check_interval: float = 60.0,
    ) -> None:
        self.all = [Upstream(h, p) for h, p in addresses]
        for up in self.all:
            if (up.host, up.port) in own:
                up.looping = up.own = True
                up.healthy = False
                up.last_error = "is one of noded's own listen addresses"
                log.error("upstream skipped: it is noded itself", upstream=up.address)
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.max_fails = max_fails
        self.probe_interval = probe_interval
        self.active = 0
        self.latency = LatencyHistogram(DNS_BUCKETS)  # (upstream, rcode) -> seconds per answered query
        self._inflight: dict[FlightKey, asyncio.Future] = {}
        self._probes: dict[str, asyncio.Task] = {}
        self.loop_check_interval = loop_check_interval
        self._loop_names: dict[str, tuple[Upstream, list[bool]]] = {}  # probe name -> (upstream, [came back])

    def usable(self) -> list[Upstream]:
        """Healthy ones in order, then the down ones as a last resort; never a looping one."""
        live = [u for u in self.all if not u.looping]
        return [u for u in live if u.healthy] + [u for u in live if not u.healthy]

    def is_loop(self, query: dns.message.Message) -> bool:
        """True when this incoming query is one of noded's own loop probes: its upstream loops."""
        name = query.question[0].name.to_text().lower()
        if not name.endswith(LOOP_ZONE):
            return False
        found = self._loop_names.get(name)
        if found is None:
            return False  # a client's guess, or a probe from long ago: an ordinary (NXDOMAIN) name
        up, came_back = found
        came_back[0] = True
        if not up.looping:
            up.looping, up.healthy = True, False
            up.last_error = "forwarding loop: queries sent there come back to noded"
            log.error("forwarding loop detected; upstream set aside", upstream=up.address)
        return True

    async def watch_loops(self) -> None:
        """check_loops() now and every loop_check_interval, for as long as the resolver runs."""
        while True:
            await self.check_loops()
            await asyncio.sleep(self.loop_check_interval)

    async def check_loops(self) -> None:
        await asyncio.gather(*(self._check_loop(up) for up in self.all if not up.own))

    async def _check_loop(self, up: Upstream) -> None:
        name = f"{secrets.token_hex(8)}.{secrets.token_hex(4)}.{LOOP_ZONE}"
        came_back = [False]
        self._loop_names[name] = (up, came_back)
        probe = dns.message.make_query(name, dns.rdatatype.HINFO)
        try:
            with contextlib.suppress(TimeoutError, OSError, dns.exception.DNSException):
                await asyncio.wait_for(_exchange(probe.to_wire(), probe, up.host, up.port), self.timeout)
        finally:
            del self._loop_names[name]
        if up.looping and not came_back[0]:
            up.looping, up.healthy, up.fails = False, True, 0
            up.last_error = None
            log.info("upstream no longer loops; used again", upstream=up.address)

    async def exchange(self, key: FlightKey, query: dns.message.Message) -> dns.message.Message | None:
        """The upstream reply to the question of `query` (shared by identical questions in flight)."""
        flight = self._inflight.get(key)
        if flight is not None:
            return await asyncio.shield(flight)
        if self.active >= self.max_concurrent:
            raise Overloaded
        flight = asyncio.get_running_loop().create_future()
        self._inflight[key] = flight
        self.active += 1
        try:
            reply = await self._try_all(query)
            flight.set_result(reply)
            return reply
        except BaseException as e:
            flight.set_exception(e)
            flight.exception()  # retrieved: waiters get it, nobody is warned
            raise
        finally:
            self.active -= 1
            del self._inflight[key]

    async def _try_all(self, query: dns.message.Message) -> dns.message.Message | None:
        q = query.question[0]
        out = dns.message.make_query(q.name, q.rdtype, q.rdclass, use_edns=0, payload=UDP_PAYLOAD)
        out.flags |= query.flags & dns.flags.CD
        if query.edns >= 0 and query.ednsflags & dns.flags.DO:
            out.want_dnssec(True)
        wire = out.to_wire()
        for up in self.usable():
            up.queries += 1
            start = time.perf_counter()
            try:
                reply = await asyncio.wait_for(_exchange(wire, out, up.host, up.port), self.timeout)
            except (TimeoutError, OSError, dns.exception.DNSException) as e:
                self._failed(up, e)
                continue
            up.fails = 0
            self.latency.observe((up.address, dns.rcode.to_text(reply.rcode())), time.perf_counter() - start)
            return reply
        return None

    def _failed(self, up: Upstream, error: BaseException) -> None:
        up.errors += 1
        up.fails += 1
        up.last_error = repr(error)
        log.warning("upstream failed", upstream=up.address, error=repr(error))
        if up.healthy and up.fails >= self.max_fails:
            up.healthy = False
            log.warning("upstream down; probing it", upstream=up.address)
            self._probes[up.address] = asyncio.ensure_future(self._probe(up))

    async def _probe(self, up: Upstream) -> None:
        probe = dns.message.make_query(".", dns.rdatatype.NS)
        while not up.healthy and not up.looping:
            await asyncio.sleep(self.probe_interval)
            probe.id = random.randrange(65536)
            try:
                await asyncio.wait_for(_exchange(probe.to_wire(), probe, up.host, up.port), self.timeout)
            except (TimeoutError, OSError, dns.exception.DNSException):
                up.healthcheck_failures += 1
                continue
            up.healthy, up.fails = True, 0
            log.info("upstream back", upstream=up.address)
        self._probes.pop(up.address, None)

    def status(self) -> list[dict]:
        return [
            {
                "address": u.address,
                "healthy": u.healthy,
                "looping": u.looping,
                "queries": u.queries,
                "errors": u.errors,
                "lastError": u.last_error,
            }
            for u in self.all
        ]


async def _exchange(wire: bytes, query: dns.message.Message, host: str, port: int) -> dns.message.Message:
    """One query over UDP, again over TCP when the answer comes back truncated."""
    reply = dns.message.from_wire(await _udp(wire, host, port))
    if not query.is_response(reply):
        raise dns.exception.FormError("upstream answered another question")
    if reply.flags & dns.flags.TC:
        reply = dns.message.from_wire(await _tcp(wire, host, port))
        if not query.is_response(reply):
            raise dns.exception.FormError("upstream answered another question")
    return reply


async def _udp(wire: bytes, host: str, port: int) -> bytes:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, _addr: object) -> None:
            if not done.done() and data[:2] == wire[:2]:
                done.set_result(data)

        def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: the upstream is not there
            if not done.done():
                done.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(_Client, remote_addr=(host, port))
    try:
        transport.sendto(wire)
        return await done
    finally:
        transport.close()


async def _tcp(wire: bytes, host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        length = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(length)
    finally:
        writer.close()
