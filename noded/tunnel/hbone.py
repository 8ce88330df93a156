"""HBONE, Istio ambient's tunnel: each TCP connection is an HTTP/2 CONNECT stream over mutual TLS to the
destination's port 15008, `:authority` naming the destination address and port.

h2 (a sans-IO HTTP/2 core) does the protocol; `_Connection` is the thin asyncio adapter: it feeds h2
what the socket reads, writes what h2 has to send, and hands each stream's data to a `Stream`, whose
writes wait for HTTP/2 flow-control credit. Windows start at 4 MiB (64 KiB, HTTP/2's default, would cap a
stream at one window per round trip), frames may be 256 KiB. `serve_connection` is the 15008 side: the TLS handshake has
verified the client's chain; its SPIFFE ID is read, `authorize(identity, host, port)` decides, `dial`
reaches the application, and the stream is spliced to it. `open_stream` is the client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import structlog

from noded.tunnel.tls import PeerRejected, peer_identity

log = structlog.get_logger("noded.tunnel.hbone")

# h2 formats repr(frame) for every frame it receives, logging or not, and hyperframe's DataFrame repr
# re-serializes and hex-encodes the whole payload: with 256 KiB frames that was a third of the tunnel's CPU
# time. A DATA frame's repr names its size instead.
hyperframe.frame.DataFrame._body_repr = lambda self: f"<{len(self.data)} bytes>"  # type: ignore[method-assign]
WINDOW = 4 * 1024 * 1024
FRAME = 256 * 1024  # frames this large cost h2 a sixteenth of the Python work per byte of the 16 KiB default
READ_SIZE = 256 * 1024

Authorize = Callable[[str, str, int], bool]
Dial = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class TunnelRefused(Exception):
    """The peer answered the CONNECT with another status than 200."""

    def __init__(self, status: str) -> None:
        super().__init__(f"HBONE CONNECT refused with status {status}")
        self.status = status


def authority(host: str, port: int) -> str:
    """`:authority` for host:port (an IPv6 address in brackets); split_authority reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_authority(authority: str) -> tuple[str, int]:
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{authority!r} is not host:port")
    return host.strip("[]"), int(port)


class Stream:
    """One CONNECT stream: read() (b"" at the end), write(), end()."""

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.received: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.response: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    def fail(self, why: str) -> None:
        """No response will come: whoever awaits it gets the error (on the server side nobody does)."""
        if not self.response.done():
            self.response.set_exception(ConnectionResetError(why))
            self.response.exception()  # retrieved: no "never retrieved" warning where nobody waits

    async def read(self, _size: int = -1) -> bytes:
        """The next data received (whatever its size, as the StreamReader.read it stands in for)."""
        data = await self.received.get()
        if data is None:
            self.received.put_nowait(None)  # stays at the end
            return b""
        return data

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        h2c = self.conn.h2
        while view:
            if self.conn.closed:
                raise ConnectionResetError("HBONE connection closed")
            window = min(h2c.local_flow_control_window(self.id), h2c.max_outbound_frame_size)
            if window <= 0:
                self.conn.credit.clear()
                await self.conn.credit.wait()
                continue
            h2c.send_data(self.id, bytes(view[:window]))
            view = view[window:]
            await self.conn.flush()

    async def end(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.conn.h2.end_stream(self.id)
            await self.conn.flush()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: bool) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding="utf-8"))
        self.streams: dict[int, Stream] = {}
        self.credit = asyncio.Event()
        self.closed = False
        self.task: asyncio.Task | None = None
        self.h2.initiate_connection()
        self.h2.update_settings(
            {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW, h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME}
        )
        self.h2.increment_flow_control_window(WINDOW - 65535)

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.writer.write(data)
            await self.writer.drain()

    async def run(self, on_request: Callable[[Stream, dict[str, str]], Awaitable[None]] | None = None) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            await self.flush()
            while data := await self.reader.read(READ_SIZE):
                for event in self.h2.receive_data(data):
                    self._handle(event, on_request, tasks)
                await self.flush()
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as e:
            log.debug("HBONE connection ended", error=repr(e))
        finally:
            self.closed = True
            self.credit.set()
            for stream in self.streams.values():
                stream.received.put_nowait(None)
                stream.fail("HBONE connection closed")
            self.writer.close()

    def _handle(self, event: h2.events.Event, on_request, tasks: set[asyncio.Task]) -> None:
        if isinstance(event, h2.events.RequestReceived) and on_request is not None:
            stream = self.streams[event.stream_id] = Stream(self, event.stream_id)
            task = asyncio.ensure_future(on_request(stream, dict(event.headers)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.response.done():
                stream.response.set_result(dict(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.received.put_nowait(event.data)
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.received.put_nowait(None)
                stream.fail("HBONE stream reset")
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.credit.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.reader.feed_eof()


async def pipe(reader: asyncio.StreamReader | Stream, writer: asyncio.StreamWriter) -> None:
    """Copy to the writer until the reader ends, then half-close the writer."""
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def splice(stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Copy both ways until both ends are done; bytes sent into the stream."""
    sent = 0

    async def outward() -> None:
        nonlocal sent
        try:
            while data := await reader.read(READ_SIZE):
                await stream.write(data)
                sent += len(data)
        except (OSError, ConnectionResetError):
            pass
        await stream.end()

    await asyncio.gather(outward(), pipe(stream, writer))
    writer.close()
    return sent


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    trust_domain: str,
    authorize: Authorize,
    dial: Dial,
) -> None:
    """One accepted TLS connection on 15008: its CONNECT streams, authorized and spliced to the app."""
    try:
        identity = peer_identity(writer.get_extra_info("ssl_object"), trust_domain)
    except (PeerRejected, ValueError) as e:
        log.warning("HBONE peer rejected", error=str(e))
        writer.close()
        return
    conn = _Connection(reader, writer, client=False)

    async def on_request(stream: Stream, headers: dict[str, str]) -> None:
        status = "200"
        try:
            host, port = split_authority(headers.get(":authority", ""))
        except ValueError:
            host, port, status = "", 0, "400"
        if headers.get(":method") != "CONNECT":
            status = "405"
        elif status == "200" and not authorize(identity, host, port):
            status = "401"
            log.info("HBONE connection denied", peer=identity, destination=f"{host}:{port}")
        app = None
        if status == "200":
            try:
                app = await dial(host, port)
            except OSError as e:
                status = "503"
                log.info("HBONE destination unreachable", destination=f"{host}:{port}", error=str(e))
        conn.h2.send_headers(stream.id, [(":status", status)], end_stream=status != "200")
        await conn.flush()
        if app is not None:
            log.info("HBONE connection", peer=identity, destination=f"{host}:{port}")
            await splice(stream, *app)

    await conn.run(on_request)


async def connect(host: str, port: int, context: ssl.SSLContext, sock: object | None = None) -> _Connection:
    """An HBONE client connection to host:port (over `sock`, connected already, if given), its reader running."""
    if sock is not None:
        reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname=host)
    else:
        reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
    conn = _Connection(reader, writer, client=True)
    conn.task = asyncio.ensure_future(conn.run())
    return conn


async def request(conn: _Connection, authority: str) -> Stream:
    """A CONNECT stream to `authority` on an open connection; TunnelRefused on a non-200 answer."""
    stream_id = conn.h2.get_next_available_stream_id()
    stream = conn.streams[stream_id] = Stream(conn, stream_id)
    conn.h2.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
    await conn.flush()
    headers = await stream.response
    if headers.get(":status") != "200":
        raise TunnelRefused(headers.get(":status", "?"))
    return stream


async def open_stream(
    host: str, port: int, context: ssl.SSLContext, authority: str, sock: object | None = None
) -> tuple[Stream, asyncio.Task]:
    """A CONNECT stream on a connection of its own, and that connection's task."""
    conn = await connect(host, port, context, sock)
    try:
        return await request(conn, authority), conn.task
    except BaseException:
        conn.writer.close()
        raise


class Pool:
    """Client connections kept per key (source pod and destination), as ztunnel pools them: a new TCP
    connection through the tunnel costs one stream, not a TCP and TLS handshake. A connection that closed,
    has no stream left to give, or was made with another certificate (`token`) is replaced."""

    def __init__(self) -> None:
        self.connections: dict[object, tuple[_Connection, object]] = {}

    async def stream(
        self, key: object, token: object, authority: str, dial: Callable[[], Awaitable[_Connection]]
    ) -> Stream:
        held = self.connections.get(key)
        if held is not None and not held[0].closed and held[1] == token:
            try:
                return await request(held[0], authority)
            except (h2.exceptions.TooManyStreamsError, h2.exceptions.NoAvailableStreamIDError):
                pass
        if held is not None:
            held[0].writer.close()  # its streams end with it: it was not taking new ones anyway
        conn = await dial()
        self.connections[key] = (conn, token)
        return await request(conn, authority)

    def drop(self, match: Callable[[object], bool]) -> None:
        for key in [k for k in self.connections if match(k)]:
            self.connections.pop(key)[0].writer.close()
