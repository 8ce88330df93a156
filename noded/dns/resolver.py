"""The resolver behind the capture port: the cluster zone (noded/dns/zone.py) from the model, everything
else forwarded to the upstreams.

The core (`answer_local`) is sans-IO: bytes in, a reply or None (forward) out; `Resolver.resolve` adds the
asyncio forwarding (and resolves ExternalName targets outside the zone). Not yet: TCP fallback for large
answers on this path, caching, upstream health and the search-path shortcut (issue 5).
"""

from __future__ import annotations

import asyncio
import contextlib

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

from noded.dns.zone import ClusterZone
from noded.model.tracker import ServiceModel

log = structlog.get_logger("noded.dns")
TTL = 5


def _read_resolv_conf(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        with open(path) as f:
            return [line.split()[1] for line in f if line.startswith("nameserver") and len(line.split()) > 1]
    except OSError:
        return []


class Resolver:
    def __init__(
        self, model: ServiceModel, domain: str = "cluster.local", upstreams: list[str] | None = None, ttl: int = TTL
    ) -> None:
        self.model = model
        self.zone = ClusterZone(model, domain, ttl)
        self.upstreams = upstreams or _read_resolv_conf()
        self.answered = 0
        self.forwarded = 0

    def answer_local(self, wire: bytes) -> tuple[dns.message.Message, dns.name.Name | None] | None:
        """(reply, external CNAME target to chase) for a query the cluster zone answers; None to forward.
        Raises on a malformed query."""
        query = dns.message.from_wire(wire)
        if query.flags & dns.flags.QR:
            raise ValueError("a response, not a query")
        if len(query.question) != 1 or query.opcode() != dns.opcode.QUERY:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.FORMERR if len(query.question) != 1 else dns.rcode.NOTIMP)
            return reply, None
        answer = self.zone.answer(query)
        if answer is None:
            return None
        self.answered += 1
        return answer.reply, answer.chase

    async def resolve(self, wire: bytes) -> bytes | None:
        """The reply to send, or None (malformed: no reply at all, never an amplified one)."""
        try:
            local = self.answer_local(wire)
        except Exception:
            return None
        if local is not None:
            reply, chase = local
            if chase is not None:  # ExternalName to an outside name: its records follow the CNAME, as CoreDNS does
                target = dns.message.make_query(chase, reply.question[0].rdtype)
                upstream = await self._forward(target.to_wire())
                if upstream is not None:
                    with contextlib.suppress(Exception):
                        reply.answer += dns.message.from_wire(upstream).answer
            return reply.to_wire()
        return await self._forward(wire) or _servfail(wire)

    async def _forward(self, wire: bytes) -> bytes | None:
        self.forwarded += 1
        for upstream in self.upstreams:
            try:
                return await asyncio.wait_for(_udp_exchange(wire, upstream), 2.0)
            except (TimeoutError, OSError):
                log.warning("upstream failed", upstream=upstream)
        return None


def _servfail(wire: bytes) -> bytes:
    reply = dns.message.make_response(dns.message.from_wire(wire))
    reply.set_rcode(dns.rcode.SERVFAIL)
    return reply.to_wire()


async def _udp_exchange(wire: bytes, upstream: str, port: int = 53) -> bytes:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, _addr: object) -> None:
            if not done.done() and data[:2] == wire[:2]:
                done.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not done.done():
                done.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(_Client, remote_addr=(upstream, port))
    try:
        transport.sendto(wire)
        return await done
    finally:
        transport.close()
