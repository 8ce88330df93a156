"""HBONE, Istio ambient's tunnel: each TCP connection is an HTTP/2 CONNECT stream over mutual TLS to the
destination's port 15008, `:authority` naming the destination address and port (the HTTP/2 is h2conn.py's).

`ServerConnection` is the 15008 side: the handshake has verified the client's chain; its SPIFFE ID is
read, `authorize` decides, `dial` reaches the application (in the same read as the CONNECT when the
connect completes at once), and the stream is spliced to it; an access log line is written as each
connection ends. `connect` + `open_request` (or `Pool.stream`) are the client side: the stream can carry
the application's bytes before the answer; `request` waits for the 200.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

import structlog

from noded.tunnel import frames as f
from noded.tunnel.ca import trust_domain_of
from noded.tunnel.h2conn import Connection, InProcess, Stream, StreamsExhausted
from noded.tunnel.relay import finish_connect, live, spawn
from noded.tunnel.tls import PeerRejected, peer_identity

log = structlog.get_logger("noded.tunnel.hbone")

HANDSHAKE_TIMEOUT = 10
ANSWER_DELAY = 0.002  # seconds a 200 may wait to go out with the application's first bytes
MAX_DIALS = 64  # connects to the application in progress at once for one HBONE connection


class TunnelRefused(Exception):
    """The peer answered the CONNECT with another status than 200."""

    def __init__(self, status: str) -> None:
        super().__init__(f"HBONE CONNECT refused with status {status}")
        self.status = status


def authority(host: str, port: int) -> str:
    """`:authority` for host:port (an IPv6 address in brackets); split_authority reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_authority(authority: str) -> tuple[str, int]:
    """(address, port) of an `:authority`; an IP address only: a name would be resolved, blocking the loop,
    and HBONE names the destination pod's address."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{authority!r} is not address:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return str(ipaddress.ip_address(host)), int(port)


# -- the 15008 side ----------------------------------------------------------------------------------
class ServerConnection(Connection):
    """An accepted HBONE connection (TLS from the first byte, the handshake done before connection_made):
    `authorize(identity, client address, host, port)` decides each CONNECT, `dial(client address, host,
    port)` gives a non-blocking socket to the application and whether its connect is done already (else it
    is in progress), `on_connection(transport, identity)` runs once the client's identity is known."""

    def __init__(
        self,
        trust_domain: str,
        authorize: Callable[[str, tuple, str, int], bool],
        dial: Callable[[tuple, str, int], tuple[socket.socket, bool]],
        on_connection: Callable[[asyncio.BaseTransport, str], None] | None = None,
        serves: Callable[[str, int], bool] = lambda _host, _port: True,
        on_stream: Callable[[str, tuple, str, int], Callable[[int, int], None]] | None = None,
    ) -> None:
        super().__init__(client=False, on_request=self._request)
        # telemetry: called as a stream is spliced (identity, client address, host, port); what it returns is
        # called with the bytes received from the client and sent back to it once the stream is over
        self.on_stream = on_stream
        self.trust_domain, self.authorize, self.dial, self.on_connection = trust_domain, authorize, dial, on_connection
        self.serves = serves  # whether an address:port is one this listener reaches (its pod's own)
        self.dialing = 0
        self.identity = ""
        self.peer: tuple = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self.identity = peer_identity(transport.get_extra_info("ssl_object"), self.trust_domain)
        except (PeerRejected, ValueError) as e:
            log.warning("HBONE peer rejected", error=str(e))
            transport.close()
            return
        self.peer = transport.get_extra_info("peername")
        if self.on_connection is not None:
            self.on_connection(transport, self.identity)
        super().connection_made(transport)

    def _request(self, stream: Stream, headers: dict[str, str]) -> None:
        """A CONNECT, as it is read: decided and dialed at once; when the connect is done already, the data
        that follows it in the same read goes to the application straight away."""
        status = "200"
        try:
            host, port = split_authority(headers.get(":authority", ""))
        except ValueError:
            host, port, status = "", 0, "400"
        if headers.get(":method") != "CONNECT":
            status = "405"
        elif status == "200" and not self.serves(host, port):
            status = "400"  # loopback, metadata addresses, VIPs, other pods: never this listener's to dial
            log.info("HBONE destination not served here", peer=self.identity, destination=f"{host}:{port}")
        elif status == "200" and not self.authorize(self.identity, self.peer, host, port):
            status = "401"
            log.info("HBONE connection denied", peer=self.identity, destination=f"{host}:{port}")
        elif status == "200" and self.dialing >= MAX_DIALS:
            status = "503"
            log.info("HBONE connection refused: too many dials in progress", peer=self.identity)
            self.count_reset()  # a flood of CONNECTs is the rapid-reset class too: past the budget, GOAWAY
        sock, connected = None, False
        if status == "200":
            try:
                sock, connected = self.dial(self.peer, host, port)
            except OSError as e:
                status = self._unreachable(host, port, e)
        if sock is None:
            self._answer(stream, status)
            return
        if isinstance(sock, InProcess):  # the stream ends in this process (the waypoint)
            spawn(self.tasks, self._serve_in_process(stream, sock.protocol, host, port))
            return
        if connected:
            stream.sock = sock
        else:  # counted from now: a burst of CONNECTs in one read sees the dials before it
            self.dialing += 1
        spawn(self.tasks, self._splice(stream, sock, connected, host, port))

    def _unreachable(self, host: str, port: int, error: OSError) -> str:
        log.info("HBONE destination unreachable", destination=f"{host}:{port}", error=str(error))
        return "503"

    def _answer(self, stream: Stream, status: str) -> None:
        if stream.closed:
            return
        self.send_headers(stream.id, [(":status", status)], end_stream=status != "200")
        if status != "200":
            stream.local_ended = True
            self.forget(stream.id)
            self.flush()
        elif stream.received:  # the client did not wait for it: it can wait a little for the app's answer
            self.flush_soon(ANSWER_DELAY)
        else:
            self.flush()

    async def _splice(self, stream: Stream, sock: socket.socket, connected: bool, host: str, port: int) -> None:
        if not connected:
            try:
                await finish_connect(sock, (host, port))
            except (OSError, TimeoutError) as e:
                sock.close()
                self._answer(stream, self._unreachable(host, port, e if isinstance(e, OSError) else OSError(str(e))))
                return
            finally:
                self.dialing -= 1
        if stream.closed:
            sock.close()
            return
        started = time.monotonic()
        await self._counted(stream, host, port, stream.attach(sock, lambda: self._answer(stream, "200")))
        log.info(  # an access log line per connection, as ztunnel's, once it is over: off the connection's path
            "HBONE connection complete",
            peer=self.identity,
            source=self.peer[0],
            destination=f"{host}:{port}",
            bytes_in=stream.bytes_in,
            bytes_out=stream.bytes_out,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _serve_in_process(self, stream: Stream, protocol: asyncio.Protocol, host: str, port: int) -> None:
        await self._counted(stream, host, port, stream.attach_protocol(protocol, lambda: self._answer(stream, "200")))

    async def _counted(self, stream: Stream, host: str, port: int, attached: Awaitable[None]) -> None:
        """The stream's splice (`attached`), told to the telemetry as it opens and, with its bytes, as it ends."""
        closed = self.on_stream(self.identity, self.peer, host, port) if self.on_stream else None
        try:
            await attached
        finally:
            if closed is not None:
                closed(stream.bytes_in, stream.bytes_out)


async def serve(sock: socket.socket, context: ssl.SSLContext, factory: Callable[[], Connection]) -> asyncio.Server:
    """An HBONE listener on a bound, listening socket; `factory` makes a ServerConnection."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, sock=sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)


# -- the client side ---------------------------------------------------------------------------------
async def connect(
    host: str, port: int, context: ssl.SSLContext, sock: socket.socket | None = None, expect: str | None = None
) -> Connection:
    """An HBONE client connection to host:port (over `sock`, connected already, if given). With `expect`
    (a SPIFFE ID), the server must present exactly that identity, as ztunnel checks: a certificate of the
    right trust domain for another workload is refused (PeerRejected)."""
    loop = asyncio.get_running_loop()
    where = {"sock": sock} if sock is not None else {"host": host, "port": port}
    transport, conn = await loop.create_connection(
        lambda: Connection(client=True),
        ssl=context,
        server_hostname=host,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        **where,
    )
    if expect is not None:
        try:
            got = peer_identity(transport.get_extra_info("ssl_object"), trust_domain_of(expect))
        except (PeerRejected, ValueError) as e:
            transport.abort()
            raise PeerRejected(f"HBONE server at {host}:{port}: {e}") from None
        if got != expect:
            transport.abort()
            raise PeerRejected(f"HBONE server at {host}:{port} is {got}, expected {expect}")
    return conn


def open_request(conn: Connection, authority: str) -> Stream:
    """A CONNECT stream to `authority` on an open connection, at once: data sent on it waits at the server
    until the answer (a refusal closes the stream), which saves the tunnel a round trip per connection.
    StreamsExhausted where the connection takes no new stream."""
    if conn.closed or not live(conn.transport):
        raise StreamsExhausted("HBONE connection closed")
    if len(conn.streams) >= conn.peer_streams or conn.next_id > f.MAX_WINDOW:
        raise StreamsExhausted(f"HBONE connection has {len(conn.streams)} streams, next ID {conn.next_id}")
    stream_id, conn.next_id = conn.next_id, conn.next_id + 2
    stream = conn.add(stream_id)
    conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
    conn.flush_soon()
    return stream


async def request(conn: Connection, authority: str) -> Stream:
    """A CONNECT stream to `authority` once the server has accepted it; TunnelRefused on a non-200 answer."""
    stream = open_request(conn, authority)
    headers = await stream.response
    if headers.get(":status") != "200":
        conn.forget(stream.id)
        raise TunnelRefused(headers.get(":status", "?"))
    return stream


async def open_stream(
    host: str,
    port: int,
    context: ssl.SSLContext,
    authority: str,
    sock: socket.socket | None = None,
) -> tuple[Stream, Connection]:
    """A CONNECT stream on a connection of its own, and that connection."""
    conn = await connect(host, port, context, sock)
    try:
        return await request(conn, authority), conn
    except BaseException:
        conn.close()
        raise


class Pool:
    """Client connections kept per key (source pod and destination), as ztunnel pools them: a new TCP
    connection through the tunnel costs one stream, not a TCP and TLS handshake. A connection that closed,
    has no stream left to give, or was made with another certificate (`token`: a renewed one) is replaced;
    the streams it carries go on until they end. `drop` (the pod is gone) closes them all."""

    def __init__(self) -> None:
        self.connections: dict[object, tuple[Connection, object]] = {}

    def stream_now(self, key: object, token: object, authority: str) -> Stream | None:
        """A stream (see open_request) on the connection held for `key`, if there is one made with `token`
        that takes one more."""
        held = self.connections.get(key)
        if held is None or held[0].closed or held[1] != token:
            return None
        try:
            return open_request(held[0], authority)
        except StreamsExhausted:
            return None

    async def stream(
        self, key: object, token: object, authority: str, dial: Callable[[], Awaitable[Connection]]
    ) -> Stream:
        """A stream on the held connection, or on a new one from `dial()` that is held from then on."""
        stream = self.stream_now(key, token, authority)
        if stream is not None:
            return stream
        held = self.connections.pop(key, None)
        if held is not None:
            held[0].retire()  # the connections it carries go on; it closes after the last
        conn = await dial()
        self.connections[key] = (conn, token)
        return open_request(conn, authority)

    def drop(self, match: Callable[[object], bool]) -> None:
        for key in [k for k in self.connections if match(k)]:
            self.connections.pop(key)[0].close()
