"""asyncio adapters from sockets to the resolver: DNS over UDP and over TCP (RFC 7766 framing).

`Classify` tells the resolver who sent a query from the peer address; the in-pod listeners know their pod
already, the node-local listener asks `Clients`. TCP connections may carry several queries (answered in
order) and are closed after `TCP_IDLE` seconds without one, as CoreDNS does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Awaitable, Callable

from noded.dns.resolver import Client

Resolve = Callable[[bytes, Client], Awaitable[bytes | None]]
Classify = Callable[[tuple], Client]
TCP_IDLE = 10.0


class Clients:
    """Who may ask the node-local listener: this node's pods (their namespace known) and the node itself."""

    def __init__(self, pod_namespace: Callable[[str], str | None], node_addresses: Callable[[], set[str]]) -> None:
        self.pod_namespace = pod_namespace
        self.node_addresses = node_addresses

    def classify(self, peer: tuple) -> Client:
        ip = ipaddress.ip_address(peer[0].split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        text = str(ip)
        namespace = self.pod_namespace(text)
        if namespace is not None:
            return Client(namespace=namespace, family=ip.version)
        return Client(allowed=ip.is_loopback or text in self.node_addresses(), family=ip.version)


class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, resolve: Resolve, classify: Classify) -> None:
        self.resolve = resolve
        self.classify = classify
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        task = asyncio.ensure_future(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr: tuple) -> None:
        reply = await self.resolve(data, self.classify(addr))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def tcp_handler(resolve: Resolve, classify: Classify) -> Callable:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = dataclasses.replace(classify(writer.get_extra_info("peername")), tcp=True)
        try:
            while True:
                length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TCP_IDLE), "big")
                reply = await resolve(await asyncio.wait_for(reader.readexactly(length), TCP_IDLE), client)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    return handle


async def serve(udp: object, tcp: object, resolve: Resolve, classify: Classify) -> list:
    """Serve DNS on a bound UDP socket and a listening TCP socket; the servers/transports to close."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: UdpServer(resolve, classify), sock=udp)
    server = await asyncio.start_server(tcp_handler(resolve, classify), sock=tcp)
    return [transport, server]
