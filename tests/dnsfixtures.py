"""DNS test parts: the cluster used by the zone and resolver tests, and a real upstream server on loopback."""

from __future__ import annotations

import asyncio
import socket

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from noded.model.tracker import ServiceModel
from tests.objects import endpoint, service, slice_

Z = "cluster.local"


def udp_tcp_pair(port: int = 0) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on one loopback port, as a DNS server listens (non-blocking, TCP listening).
    With port 0, a free UDP port whose TCP twin another test's ephemeral port holds is given up for another."""
    for attempt in range(10):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on its port, as asyncio's servers
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            if port or attempt == 9:
                raise
            continue
        tcp.listen(16)
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise AssertionError("unreachable")


def cluster_model() -> ServiceModel:
    m = ServiceModel()
    ports = [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    m.upsert(service("web", ["10.96.0.10", "fd96::10"], ports=ports))
    m.upsert(service("db", "None", ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}]))
    db_eps = [endpoint("10.244.1.5"), endpoint("10.244.2.7"), endpoint("10.244.3.9", ready=False)]
    db_eps[0]["hostname"] = "db-0"
    m.upsert(slice_("db", db_eps, ports=[{"name": "pg", "port": 15432, "protocol": "TCP"}]))
    m.upsert(service("pub", "None", publishNotReadyAddresses=True))
    m.upsert(slice_("pub", [endpoint("10.244.1.8", ready=False)], name="pub-x"))
    ext = service("ext", "10.96.0.1")
    ext["spec"] = {"type": "ExternalName", "externalName": "example.org"}
    m.upsert(ext)
    alias = service("alias", "10.96.0.1")
    alias["spec"] = {"type": "ExternalName", "externalName": f"web.default.svc.{Z}"}
    m.upsert(alias)
    return m


class FakeUpstream:
    """A DNS server on 127.0.0.1 (UDP and TCP) answering A and AAAA records from `records` (NODATA for a
    family a name lacks), NXDOMAIN otherwise.

    It counts the questions it saw; `stop()`/`start()` take it away and bring it back on the same port;
    `delay` holds every answer back. Runs on the test's own event loop.
    """

    def __init__(self, records: dict[str, list[str]], ttl: int = 300, delay: float = 0.0) -> None:
        self.records = {k.lower().rstrip(".") + ".": v for k, v in records.items()}
        self.ttl = ttl
        self.delay = delay
        self.seen: list[str] = []
        self.ids: list[int] = []  # of the queries it saw
        self.pending: set[asyncio.Task] = set()
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def answer(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        q = query.question[0]
        name = q.name.to_text().lower()
        self.seen.append(name)
        reply = dns.message.make_response(query)
        if name in self.records:
            family = {dns.rdatatype.A: ".", dns.rdatatype.AAAA: ":"}.get(q.rdtype)
            same = [ip for ip in self.records[name] if family and family in ip]
            if same:
                rdtype = dns.rdatatype.to_text(q.rdtype)
                reply.answer.append(dns.rrset.from_text_list(q.name, self.ttl, "IN", rdtype, same))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            reply.authority.append(dns.rrset.from_text(".", 3600, "IN", "SOA", "a.root. nstld. 1 1800 900 604800 60"))
        return reply.to_wire(max_size=65535)

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                upstream.ids.append(int.from_bytes(data[:2], "big"))

                async def later():
                    await asyncio.sleep(upstream.delay)
                    wire = upstream.answer(data)
                    if len(wire) > 512 + 720:  # over the payload noded asks for: truncated, as a server would
                        reply = dns.message.from_wire(wire)
                        reply.answer = []
                        reply.flags |= dns.flags.TC
                        wire = reply.to_wire()
                    self.transport.sendto(wire, addr)

                upstream.pending.add(task := asyncio.ensure_future(later()))
                task.add_done_callback(upstream.pending.discard)

        udp, tcp = udp_tcp_pair(self.port)  # after stop(), the same port again
        self.port = udp.getsockname()[1]
        self._udp, _ = await loop.create_datagram_endpoint(Udp, sock=udp)
        self._tcp = await asyncio.start_server(self._tcp_handler, sock=tcp)
        return self

    async def _tcp_handler(self, reader, writer) -> None:
        length = int.from_bytes(await reader.readexactly(2), "big")
        wire = self.answer(await reader.readexactly(length))
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        writer.close()

    def stop(self) -> None:
        self._udp.close()
        self._tcp.close()
