"""The listeners inside each captured pod's netns, served by one asyncio loop in the daemon.

15001 (outbound) reads the original destination with SO_ORIGINAL_DST and 15006 (inbound, TPROXY) takes
it from the accepted socket's own address; until the node tunnel exists both forward the connection
there from inside the pod, on a socket marked 0x539 so it is not captured again. 15053 (UDP and TCP)
hands DNS to the resolver
(noded/dns), which knows the pod's namespace. 15008 (HBONE) listens for the tunnel; without it, connections are closed.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from noded.dns.resolver import Client
from noded.dns.server import serve as serve_dns
from noded.loopthread import LoopThread
from noded.redirect import podns
from noded.redirect.rules import DNS_PORT, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, TUNNEL_MARK

log = structlog.get_logger("noded.redirect.proxy")

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
SO_MARK = 36
DnsHandler = Callable[[bytes, Client], Awaitable[bytes | None]]


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack(">H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


@dataclass
class PodListeners:
    netns: str
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))


class CaptureProxy:
    def __init__(self, dns_handler: DnsHandler, loop: LoopThread) -> None:
        self.dns_handler = dns_handler
        self.thread = loop
        self.loop = loop.loop
        self.pods: dict[str, PodListeners] = {}

    def stop(self) -> None:
        for key in list(self.pods):
            self.close_pod(key)

    def open_pod(self, key: str, netns_path: str, namespace: str | None = None) -> None:
        """Listening sockets in the pod's netns (kept if already open); DNS knows the pod's namespace."""
        self.thread.run(self._open(key, netns_path, namespace))

    def close_pod(self, key: str) -> bool:
        return bool(self.thread.run(self._close(key)))

    def recent(self, key: str) -> list[dict]:
        pod = self.pods.get(key)
        return list(pod.recent) if pod else []

    async def _open(self, key: str, netns_path: str, namespace: str | None) -> None:
        pod = self.pods.get(key)
        if pod is not None and pod.netns == netns_path:
            return
        if pod is not None:
            await self._close(key)
        pod = PodListeners(netns_path)
        with podns.entered(netns_path):  # the loop's own thread: no other coroutine runs meanwhile
            socks = {
                "outbound": _listener(socket.SOCK_STREAM, "127.0.0.1", OUTBOUND_PORT),
                "inbound": _listener(socket.SOCK_STREAM, "127.0.0.1", INBOUND_PORT, transparent=True),
                "hbone": _listener(socket.SOCK_STREAM, "0.0.0.0", HBONE_PORT, transparent=True),
                "dns-tcp": _listener(socket.SOCK_STREAM, "127.0.0.1", DNS_PORT),
                "dns-udp": _listener(socket.SOCK_DGRAM, "127.0.0.1", DNS_PORT),
            }
        handlers = {
            "outbound": lambda r, w: self._forward(pod, "outbound", r, w),
            "inbound": lambda r, w: self._forward(pod, "inbound", r, w),
            "hbone": self._no_tunnel,
        }
        for name, handler in handlers.items():
            pod.servers.append(await asyncio.start_server(handler, sock=socks[name]))
        client = Client(namespace=namespace)
        pod.transports += await serve_dns(socks["dns-udp"], socks["dns-tcp"], self.dns_handler, lambda _peer: client)
        self.pods[key] = pod

    async def _close(self, key: str) -> bool:
        pod = self.pods.pop(key, None)
        if pod is None:
            return False
        for server in pod.servers:
            server.close()
        for transport in pod.transports:
            transport.close()
        return True

    async def _forward(
        self, pod: PodListeners, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        dst = original_dst(sock) if direction == "outbound" else writer.get_extra_info("sockname")[:2]
        record = {
            "direction": direction,
            "peer": f"{peer[0]}:{peer[1]}",
            "original": f"{dst[0]}:{dst[1]}",
            "time": time.time(),
        }
        pod.recent.append(record)
        try:
            with podns.entered(pod.netns):
                up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setsockopt(socket.SOL_SOCKET, SO_MARK, TUNNEL_MARK)
            up.setblocking(False)
            await asyncio.wait_for(self.loop.sock_connect(up, dst), 10)
            up_reader, up_writer = await asyncio.open_connection(sock=up)
        except (TimeoutError, OSError, podns.CaptureError) as e:
            record["error"] = repr(e)
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def _no_tunnel(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()


def _listener(kind: int, host: str, port: int, transparent: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind((host, port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    return s


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()
