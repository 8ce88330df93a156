"""A first resolver for the capture port: `<service>.<namespace>.svc.<domain>` A/AAAA from the model,
NXDOMAIN for other names in the cluster zone, everything else forwarded to the upstreams.

The core (`answer_local`) is sans-IO: bytes in, bytes or None (forward) out; `Resolver.resolve` adds the
asyncio forwarding. The full Kubernetes DNS specification is issue 5's.
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

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
    def __init__(self, model: ServiceModel, domain: str = "cluster.local", upstreams: list[str] | None = None) -> None:
        self.model = model
        self.zone = dns.name.from_text(f"svc.{domain}")
        self.upstreams = upstreams or _read_resolv_conf()
        self.answered = 0
        self.forwarded = 0

    def answer_local(self, wire: bytes) -> bytes | None:
        """The reply for a cluster-zone query, None for one to forward. Raises on a malformed query."""
        query = dns.message.from_wire(wire)
        if len(query.question) != 1:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.FORMERR)
            return reply.to_wire()
        q = query.question[0]
        if not q.name.is_subdomain(self.zone):
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        labels = q.name.relativize(self.zone).labels
        ips = self.model.cluster_ips(labels[1].decode().lower(), labels[0].decode().lower()) if len(labels) == 2 else ()
        if not ips:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        else:
            version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(q.rdtype)
            wanted = [ip for ip in ips if ipaddress.ip_address(ip).version == version]
            if wanted:
                reply.answer.append(dns.rrset.from_text_list(q.name, TTL, dns.rdataclass.IN, q.rdtype, wanted))
        self.answered += 1
        return reply.to_wire()

    async def resolve(self, wire: bytes) -> bytes | None:
        """The reply to send, or None (malformed: no reply at all, never an amplified one)."""
        try:
            local = self.answer_local(wire)
        except Exception:
            return None
        if local is not None:
            return local
        self.forwarded += 1
        for upstream in self.upstreams:
            try:
                return await asyncio.wait_for(_udp_exchange(wire, upstream), 2.0)
            except (TimeoutError, OSError):
                log.warning("upstream failed", upstream=upstream)
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
