"""The tunnel's client side: a connection of one of this node's pods to a meshed peer, carried in an HBONE
stream (hbone.py) on a pooled connection, dialed from inside the pod's netns.

Connections are pooled per (the pod's netns, the peer node's address, the identity expected of the peer[,
the identity presented]): a connection verified for one workload never carries another's. The capture
(noded/redirect/proxy.py) decides what comes here and from where it is dialed (`connect_from`, which raises
an OSError when it cannot); this owns the pool, the dial, a peer that presents another identity (counted,
refused), and the splice with its telemetry.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable

import structlog

from noded.tunnel.h2conn import Stream
from noded.tunnel.hbone import Pool, TunnelRefused, connect
from noded.tunnel.relay import spawn
from noded.tunnel.telemetry import TcpTelemetry
from noded.tunnel.tls import PeerRejected

log = structlog.get_logger("noded.tunnel.outbound")

ConnectFrom = Callable[[tuple[str, int]], Awaitable[socket.socket]]  # a connected socket, from the pod's netns


class HboneClient:
    def __init__(self, telemetry: TcpTelemetry, counts: dict[str, int], tasks: set[asyncio.Task], port: int) -> None:
        self.port = port  # the peers' HBONE port (the capture's: noded/redirect/rules.py)
        self.telemetry = telemetry
        self.counts = counts  # the tunnel's: hbone_out counted here
        self.tasks = tasks
        self.pool = Pool()  # shared by a pod's connections to one peer
        self.refused_peers = 0  # HBONE servers that presented another identity than the destination's

    def carry(
        self,
        sock: socket.socket,
        key: tuple,
        ctx: ssl.SSLContext,
        peer: tuple[str, str],
        target: str,
        connect_from: ConnectFrom,
        record: dict,
    ) -> None:
        """The app's connection `sock` carried to `target` (an `:authority`) through the node at `peer`
        (address, expected identity): at once, with no task, when a pooled connection takes it."""
        stream = self.pool.stream_now(key, id(ctx), target)
        if stream is not None:
            self._splice(stream, sock, record)
            return

        async def new_connection() -> None:
            try:
                stream = await self.pool.stream(key, id(ctx), target, self._dialer(ctx, peer, connect_from))
            except (TimeoutError, OSError, PeerRejected) as e:
                record["error"] = repr(e)
                if isinstance(e, PeerRejected):
                    self.refused_peers += 1
                    log.warning("HBONE server identity refused", error=str(e))
                sock.close()
                return
            self._splice(stream, sock, record)

        spawn(self.tasks, new_connection())

    async def socket_to(
        self, key: tuple, ctx: ssl.SSLContext, peer: tuple[str, str], target: str, connect_from: ConnectFrom
    ) -> socket.socket:
        """A socket whose other end is an HBONE stream to `target` (for a protocol of this process: the
        waypoint's connection to a meshed backend)."""
        try:
            stream = await self.pool.stream(key, id(ctx), target, self._dialer(ctx, peer, connect_from))
        except PeerRejected as e:
            self.refused_peers += 1
            raise ConnectionRefusedError(str(e)) from None
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        spawn(self.tasks, stream.attach(ours))
        return theirs

    def drop(self, netns: str) -> None:
        """A pod went: its connections with it."""
        self.pool.drop(lambda k: k[0] == netns)

    def _dialer(self, ctx: ssl.SSLContext, peer: tuple[str, str], connect_from: ConnectFrom):
        address, identity = peer

        async def dial() -> object:  # from the pod itself: its own address
            up = await connect_from((address, self.port))
            return await connect(address, self.port, ctx, up, expect=identity)

        return dial

    def _splice(self, stream: Stream, sock: socket.socket, record: dict) -> None:
        """The app's connection spliced to its HBONE stream; what the app has sent goes at once."""
        self.counts["hbone_out"] += 1

        def answered(response: asyncio.Future) -> None:
            if not response.cancelled() and not response.exception():
                status = response.result().get(":status")
                if status != "200":
                    record["error"] = repr(TunnelRefused(status or "?"))

        stream.response.add_done_callback(answered)
        stream.send_first(sock)
        telemetry = self.telemetry
        key = telemetry.open(record["telemetry"]) if "telemetry" in record else None

        async def spliced() -> None:
            try:
                await stream.attach(sock)
            finally:
                if key is not None:
                    telemetry.close(key, stream.bytes_out, stream.bytes_in)

        spawn(self.tasks, spliced())
