"""HBONE, Istio ambient's tunnel: each TCP connection is an HTTP/2 CONNECT stream over mutual TLS to the
destination's port 15008, `:authority` naming the destination address and port.

h2 (a sans-IO HTTP/2 core) keeps the protocol: the preface, SETTINGS, HEADERS and HPACK, the stream
states, RST_STREAM, PING, GOAWAY. The bytes do not pass through it. `_Connection` is an asyncio protocol
under the TLS transport that cuts the decrypted input into frames: DATA for a stream it carries goes
straight from the TLS buffer to the stream's socket, WINDOW_UPDATE moves its own send windows, every
other frame goes to h2. On the way out, a stream's socket is read into a buffer 9 bytes in, the DATA
frame header is written in front, and the whole goes to TLS as one write: no copy in Python either way.
Flow control is the connection's: 4 MiB windows (64 KiB, HTTP/2's default, would cap a stream at one
window per round trip), acknowledged when half is used and, for a stream, only once its socket has taken
the data (a slow reader holds back its own stream, never the connection's others).

`serve` is the 15008 side: the handshake has verified the client's chain; its SPIFFE ID is read,
`authorize` decides, `dial` reaches the application, and the stream is spliced to it. `connect` +
`request` (or `Pool.stream`) are the client side, `Stream.attach` splices a stream to a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog

from noded.tunnel.relay import READ_SIZE, live, no_delay, scratch, take_over
from noded.tunnel.tls import PeerRejected, peer_identity

log = structlog.get_logger("noded.tunnel.hbone")

WINDOW = 4 * 1024 * 1024
FRAME = 256 * 1024  # the largest DATA frame we take and send: one read of a stream's socket
DATA, WINDOW_UPDATE = 0x0, 0x8
END_STREAM, PADDED = 0x1, 0x8
MAX_WINDOW = 2**31 - 1
HANDSHAKE_TIMEOUT = 10
ANSWER_DELAY = 0.002  # seconds a 200 may wait to go out with the application's first bytes
LINGER = 10  # seconds a refused stream's socket waits for the application to end its side
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Authorize = Callable[[str, str, int], bool]
Dial = Callable[[str, int], Awaitable[socket.socket]]


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


def _frame_header(buf: bytearray | memoryview, length: int, ftype: int, flags: int, stream_id: int) -> None:
    buf[0:3] = length.to_bytes(3, "big")
    buf[3] = ftype
    buf[4] = flags
    buf[5:9] = stream_id.to_bytes(4, "big")


def _window_update(stream_id: int, increment: int) -> bytes:
    frame = bytearray(13)
    _frame_header(frame, 4, WINDOW_UPDATE, 0, stream_id)
    frame[9:13] = increment.to_bytes(4, "big")
    return bytes(frame)


class Stream:
    """One CONNECT stream. Until a socket is attached, what it receives waits here (bounded by its window)."""

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.send_window = conn.h2.remote_settings.initial_window_size
        self.recv_window = WINDOW
        self.unacked = 0  # received and delivered, not yet given back to the peer
        self.app: _AppSide | None = None
        self.early: list[bytes] = []
        self.received = False  # any data at all
        self.remote_ended = False  # the peer sent END_STREAM
        self.local_ended = False
        self.closed = False
        self.refused = False
        self.response: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def credit(self) -> int:
        return min(self.send_window, self.conn.send_window)

    def fail(self, why: str) -> None:
        """No response will come: whoever awaits it gets the error (on the server side nobody does)."""
        if not self.response.done():
            self.response.set_exception(ConnectionResetError(why))
            self.response.exception()  # retrieved: no "never retrieved" warning where nobody waits

    def app_side(self) -> _AppSide:
        """The protocol that splices the stream to a TCP connection (see attach)."""
        return _AppSide(self)

    async def attach(self, sock: socket.socket | asyncio.Transport, attached: Callable[[], None] | None = None) -> None:
        """Splice the stream to a connected socket (or a parked transport, relay.Parked) until both
        directions have ended; `attached()` runs once the socket has what the stream received so far."""
        app = self.app_side()
        if isinstance(sock, socket.socket):
            await asyncio.get_running_loop().connect_accepted_socket(lambda: app, sock)
        else:
            take_over(sock, app)
        if attached is not None:
            attached()
        await self.finished

    # -- from the connection ---------------------------------------------------------------
    def receive(self, data: memoryview) -> None:
        app = self.app
        if app is not None and app.transport is not None:
            if not app.transport.is_closing():
                app.transport.write(data)  # sends at once; what the kernel did not take is copied
        elif not self.closed:
            self.early.append(bytes(data))
        self.unacked += len(data)
        self.received = True

    def ended_by_peer(self) -> None:
        self.remote_ended = True
        app = self.app
        if app is not None and app.transport is not None and not app.transport.is_closing():
            if self.local_ended:
                app.transport.close()
            else:
                app.transport.write_eof()

    def close(self, why: str, refused: bool = False) -> None:
        """The stream is gone: reset, or its connection ended (its socket is reset too), or refused (its
        socket gets a plain end, and is closed once it ends too: a reset could lose the end)."""
        self.closed = True
        self.refused = refused
        self.fail(why)
        self.conn.streams.pop(self.id, None)
        if self.app is not None and self.app.transport is not None:
            if refused:
                self.app.end_refused()
            else:
                self.app.transport.abort()
        elif not self.finished.done():
            self.finished.set_result(None)


class _AppSide(asyncio.BufferedProtocol):
    """The TCP connection a stream is spliced to: what it reads leaves as DATA frames, what the stream
    receives is written to it."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.eof = False  # the application has ended its side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)
        stream = self.stream
        stream.app = self
        if stream.closed:
            if stream.refused:
                self.end_refused()
            else:
                self.transport.abort()
            return
        for data in stream.early:
            self.transport.write(data)
        stream.early.clear()
        if stream.remote_ended:
            self.transport.write_eof()
        stream.conn.ack(stream)
        if stream.credit <= 0 or stream.conn.write_paused:
            self.transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        size = min(FRAME, self.stream.conn.max_send_frame, max(self.stream.credit, 1))
        return scratch(9 + FRAME)[9 : 9 + size]  # 9 bytes in: the frame header goes in front

    def buffer_updated(self, nbytes: int) -> None:
        self.stream.conn.send_data(self.stream, scratch(9 + FRAME), nbytes)

    def eof_received(self) -> bool:
        stream = self.stream
        self.eof = True
        if not stream.closed:
            stream.conn.end_stream(stream)
        if stream.remote_ended or stream.closed:
            self.transport.close()
        return True

    def end_refused(self) -> None:
        """EOF to the application; what it still sends is dropped; closed when it ends (at the latest after
        LINGER seconds)."""
        transport = self.transport
        if not live(transport):
            return
        if self.eof:
            transport.close()
            return
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER, transport.abort)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.stream.conn.ack(self.stream)

    def connection_lost(self, exc: Exception | None) -> None:
        stream = self.stream
        if not stream.closed and not (stream.local_ended and stream.remote_ended):
            stream.conn.reset(stream)
        stream.conn.streams.pop(stream.id, None)
        if not stream.finished.done():
            stream.finished.set_result(None)


class _Connection(asyncio.BufferedProtocol):
    """One HBONE connection (client or server side) under its TLS transport; see the module doc."""

    def __init__(self, client: bool, on_request: Callable[[Stream, dict[str, str]], Awaitable[None]] | None = None):
        self.client = client
        self.on_request = on_request
        self.h2 = h2.connection.H2Connection(
            # what we send is a fixed CONNECT request or :status: h2's per-header checks are for what we receive
            h2.config.H2Configuration(
                client_side=client,
                header_encoding="utf-8",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.tasks: set[asyncio.Task] = set()
        self.send_window = 65535  # the peer's connection window for us; WINDOW_UPDATEs grow it
        self.recv_window = WINDOW
        self.unacked = 0
        self.closed = False
        self.write_paused = False
        self.flush_later: asyncio.TimerHandle | None = None
        self.carry = b""  # input not taken yet (a frame not whole): it goes in front of the next read
        self.preface = not client
        self.need = 0  # a frame this long is waiting to be read whole
        self.data_stream: Stream | None = None  # the stream whose DATA payload is being passed through
        self.data_left = 0
        self.pad_left = 0
        self.data_flags = 0
        self.data_id = 0

    @property
    def max_send_frame(self) -> int:
        return self.h2.max_outbound_frame_size

    # -- transport side --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)
        self.h2.initiate_connection()
        self.h2.update_settings(
            {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW, h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME}
        )
        self.h2.increment_flow_control_window(WINDOW - 65535)
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        carried = len(self.carry)
        view = scratch(carried + max(READ_SIZE, self.need))
        view[:carried] = self.carry
        return view[carried : carried + max(READ_SIZE, self.need - carried)]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._take_input(scratch(0), len(self.carry) + nbytes)
        except h2.exceptions.ProtocolError as e:
            log.info("HBONE protocol error", error=repr(e))
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(error_code=getattr(e, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))
            self.flush()
            self.transport.close()
            return
        self.flush()

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost ends the streams

    def pause_writing(self) -> None:  # TLS cannot take more: no stream reads until it can
        self.write_paused = True
        for stream in self.streams.values():
            if stream.app is not None and stream.app.transport is not None:
                stream.app.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_senders()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        log.debug("HBONE connection ended", error=repr(exc) if exc else None)
        for stream in list(self.streams.values()):
            stream.close("HBONE connection closed")

    # -- input -------------------------------------------------------------------------------
    def _take_input(self, view: memoryview, end: int) -> None:
        """Frames from view[:end] (what was carried, then what was read)."""
        buf = view
        pos = self.need = 0
        if self.preface:  # the server reads the client's connection preface first, not a frame
            if end < len(PREFACE):
                self.carry = bytes(view[:end])
                return
            self._h2_events(self.h2.receive_data(bytes(view[: len(PREFACE)])))
            pos, self.preface = len(PREFACE), False
        while True:
            if self.data_id:
                if self.data_left:
                    k = min(self.data_left, end - pos)
                    if not k:
                        break
                    if self.data_stream is not None:
                        self.data_stream.receive(view[pos : pos + k])
                    pos += k
                    self.data_left -= k
                    continue
                if self.pad_left:
                    k = min(self.pad_left, end - pos)
                    if not k:
                        break
                    pos += k
                    self.pad_left -= k
                    continue
                self._data_done()
                continue
            if end - pos < 9:
                break
            length = int.from_bytes(buf[pos : pos + 3], "big")
            ftype, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & MAX_WINDOW
            if ftype == DATA:  # every DATA frame is ours; for a stream no longer carried it is dropped
                if flags & PADDED and end - pos < 10:
                    break
                stream = self.streams.get(stream_id)
                carried = stream if stream is not None and not stream.remote_ended else None
                self._data_start(carried, stream_id, length, flags, buf[pos + 9] if flags & PADDED else 0)
                pos += 10 if flags & PADDED else 9
                continue
            if length > FRAME:
                raise h2.exceptions.FrameTooLargeError(f"frame of {length} bytes")
            if end - pos < 9 + length:
                self.need = 9 + length
                break
            if ftype == WINDOW_UPDATE and length == 4:
                self._window_update(stream_id, int.from_bytes(buf[pos + 9 : pos + 13], "big") & MAX_WINDOW)
            else:
                self._h2_events(self.h2.receive_data(bytes(view[pos : pos + 9 + length])))
            pos += 9 + length
        self.carry = bytes(view[pos:end])

    def _data_start(self, stream: Stream | None, stream_id: int, length: int, flags: int, pad: int) -> None:
        if length > FRAME or (flags & PADDED and pad >= length):
            raise h2.exceptions.ProtocolError(f"DATA frame of {length} bytes (padding {pad})")
        self.recv_window -= length
        if self.recv_window < 0:
            raise h2.exceptions.FlowControlError("peer sent DATA beyond the connection window")
        self.unacked += length
        if stream is not None:
            stream.recv_window -= length
            if stream.recv_window < 0:
                raise h2.exceptions.FlowControlError("peer sent DATA beyond the stream window")
            if flags & PADDED:  # padding counts against the window; it is given back with the data
                stream.unacked += 1 + pad
        self.data_stream, self.data_id, self.data_flags = stream, stream_id, flags
        self.data_left = length - (1 + pad if flags & PADDED else 0)
        self.pad_left = pad

    def _data_done(self) -> None:
        stream, flags, stream_id = self.data_stream, self.data_flags, self.data_id
        self.data_stream, self.data_id = None, 0
        if flags & END_STREAM:  # h2 learns the end from an empty frame: its stream state moves on
            end = bytearray(9)
            _frame_header(end, 0, DATA, END_STREAM, stream_id)
            self._h2_events(self.h2.receive_data(bytes(end)))
        self.ack(stream)

    def _window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise h2.exceptions.FlowControlError("connection window beyond 2^31-1")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self.reset(stream, h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
                return
        self._resume_senders()

    def _h2_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and self.on_request is not None:
                stream = self.streams[event.stream_id] = Stream(self, event.stream_id)
                task = asyncio.ensure_future(self.on_request(stream, dict(event.headers)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(event, h2.events.ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and not stream.response.done():
                    headers = dict(event.headers)
                    stream.response.set_result(headers)
                    if headers.get(":status") != "200":  # refused: what was sent early goes nowhere
                        stream.close(f"HBONE CONNECT refused with status {headers.get(':status')}", refused=True)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.ended_by_peer()
                    stream.fail("HBONE stream ended")
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.close("HBONE stream reset")
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                changed = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
                if changed is not None:
                    for stream in self.streams.values():
                        stream.send_window += changed.new_value - (changed.original_value or 65535)
                    self._resume_senders()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True  # GOAWAY: no new streams here
                if event.error_code:
                    self.transport.close()

    # -- output ------------------------------------------------------------------------------
    def flush(self, *frames: bytes | memoryview) -> None:
        """What h2 has queued, then `frames`, in one write to TLS (one send for all)."""
        if self.flush_later is not None:
            self.flush_later.cancel()
            self.flush_later = None
        pending = self.h2.data_to_send()
        chunks = [pending, *frames] if pending else frames
        if chunks and live(self.transport):
            self.transport.writelines(chunks)

    def flush_soon(self, delay: float = 0.0) -> None:
        """Let h2's output go with the next frame written, or after `delay` at the latest: a CONNECT goes
        with the first data the application has already sent (a delay of 0 is still after this round's
        reads), a 200 with the application's first answer."""
        if self.flush_later is None:
            self.flush_later = asyncio.get_running_loop().call_later(delay, self.flush)

    def send_data(self, stream: Stream, view: memoryview, nbytes: int) -> None:
        """The DATA frame whose payload is view[9:9 + nbytes] (the header goes in front of it)."""
        if stream.closed or stream.local_ended or self.transport is None or self.transport.is_closing():
            return
        _frame_header(view, nbytes, DATA, 0, stream.id)
        self.flush(view[: 9 + nbytes])  # after what h2 has queued; encrypted at once: the buffer is free again
        stream.send_window -= nbytes
        self.send_window -= nbytes
        if self.send_window <= 0:
            for other in self.streams.values():
                if other.app is not None and other.app.transport is not None:
                    other.app.transport.pause_reading()
        elif stream.send_window <= 0 and stream.app is not None:
            stream.app.transport.pause_reading()

    def _resume_senders(self) -> None:
        if self.write_paused or self.send_window <= 0:
            return
        for stream in self.streams.values():
            app = stream.app
            if app is not None and live(app.transport) and stream.send_window > 0 and not stream.local_ended:
                app.transport.resume_reading()

    def ack(self, stream: Stream | None) -> None:
        """Give back the window the peer used once half of it is: the connection's at once, a stream's only
        while its socket keeps up."""
        out = b""
        if self.unacked >= WINDOW // 2:
            out += _window_update(0, self.unacked)
            self.recv_window += self.unacked
            self.unacked = 0
        if stream is not None and stream.unacked and not stream.remote_ended:
            app = stream.app
            due = stream.unacked >= WINDOW // 2 or stream.recv_window < WINDOW // 2
            if due and app is not None and not app.write_paused:
                out += _window_update(stream.id, stream.unacked)
                stream.recv_window += stream.unacked
                stream.unacked = 0
        if out:
            self.flush(out)

    def end_stream(self, stream: Stream) -> None:
        stream.local_ended = True
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.h2.end_stream(stream.id)
        self.flush()

    def reset(self, stream: Stream, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.h2.reset_stream(stream.id, code)
        self.flush()
        stream.close("HBONE stream reset")

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


# -- the 15008 side ----------------------------------------------------------------------------------
class ServerConnection(_Connection):
    """An accepted HBONE connection (TLS from the first byte, the handshake done before connection_made):
    `authorize(identity, client address, host, port)` decides each CONNECT, `dial(client address, host,
    port)` gives a socket connected to the application, `on_connection(transport, identity)` runs once
    the client's identity is known."""

    def __init__(
        self,
        trust_domain: str,
        authorize: Callable[[str, tuple, str, int], bool],
        dial: Callable[[tuple, str, int], Awaitable[socket.socket]],
        on_connection: Callable[[asyncio.BaseTransport, str], None] | None = None,
    ) -> None:
        super().__init__(client=False, on_request=self._connect)
        self.trust_domain, self.authorize, self.dial, self.on_connection = trust_domain, authorize, dial, on_connection
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

    async def _connect(self, stream: Stream, headers: dict[str, str]) -> None:
        status = "200"
        try:
            host, port = split_authority(headers.get(":authority", ""))
        except ValueError:
            host, port, status = "", 0, "400"
        if headers.get(":method") != "CONNECT":
            status = "405"
        elif status == "200" and not self.authorize(self.identity, self.peer, host, port):
            status = "401"
            log.info("HBONE connection denied", peer=self.identity, destination=f"{host}:{port}")
        app = None
        if status == "200":
            try:
                app = await self.dial(self.peer, host, port)
            except OSError as e:
                status = "503"
                log.info("HBONE destination unreachable", destination=f"{host}:{port}", error=str(e))
        if stream.closed:
            if app is not None:
                app.close()
            return

        def answer() -> None:
            if not stream.closed:
                self.h2.send_headers(stream.id, [(":status", status)], end_stream=status != "200")
                if status == "200" and stream.received:  # the client did not wait for it: it can wait a little
                    self.flush_soon(ANSWER_DELAY)
                else:
                    self.flush()

        if app is None:
            answer()
            self.streams.pop(stream.id, None)
            return
        log.info("HBONE connection", peer=self.identity, destination=f"{host}:{port}")
        await stream.attach(app, answer)  # what the client sent already goes to the application first


async def serve(sock: socket.socket, context: ssl.SSLContext, factory: Callable[[], _Connection]) -> asyncio.Server:
    """An HBONE listener on a bound, listening socket; `factory` makes a ServerConnection."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, sock=sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)


# -- the client side ---------------------------------------------------------------------------------
async def connect(host: str, port: int, context: ssl.SSLContext, sock: socket.socket | None = None) -> _Connection:
    """An HBONE client connection to host:port (over `sock`, connected already, if given)."""
    loop = asyncio.get_running_loop()
    where = {"sock": sock} if sock is not None else {"host": host, "port": port}
    _t, conn = await loop.create_connection(
        lambda: _Connection(client=True),
        ssl=context,
        server_hostname=host,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        **where,
    )
    return conn


def open_request(conn: _Connection, authority: str) -> Stream:
    """A CONNECT stream to `authority` on an open connection, at once: data sent on it waits at the server
    until the answer (a refusal closes the stream), which saves the tunnel a round trip per connection."""
    if conn.closed:
        raise ConnectionResetError("HBONE connection closed")
    stream_id = conn.h2.get_next_available_stream_id()
    stream = conn.streams[stream_id] = Stream(conn, stream_id)
    conn.h2.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
    conn.flush_soon()
    return stream


async def request(conn: _Connection, authority: str) -> Stream:
    """A CONNECT stream to `authority` once the server has accepted it; TunnelRefused on a non-200 answer."""
    stream = open_request(conn, authority)
    headers = await stream.response
    if headers.get(":status") != "200":
        conn.streams.pop(stream.id, None)
        raise TunnelRefused(headers.get(":status", "?"))
    return stream


async def open_stream(
    host: str, port: int, context: ssl.SSLContext, authority: str, sock: socket.socket | None = None
) -> tuple[Stream, _Connection]:
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
    has no stream left to give, or was made with another certificate (`token`) is replaced."""

    def __init__(self) -> None:
        self.connections: dict[object, tuple[_Connection, object]] = {}

    def stream_now(self, key: object, token: object, authority: str) -> Stream | None:
        """A stream (see open_request) on the connection held for `key`, if there is one made with `token`
        that takes one more."""
        held = self.connections.get(key)
        if held is None or held[0].closed or held[1] != token:
            return None
        try:
            return open_request(held[0], authority)
        except (h2.exceptions.TooManyStreamsError, h2.exceptions.NoAvailableStreamIDError):
            return None

    async def stream(
        self, key: object, token: object, authority: str, dial: Callable[[], Awaitable[_Connection]]
    ) -> Stream:
        """A stream on the held connection, or on a new one from `dial()` that is held from then on."""
        stream = self.stream_now(key, token, authority)
        if stream is not None:
            return stream
        held = self.connections.pop(key, None)
        if held is not None:
            held[0].close()  # its streams end with it: it was not taking new ones anyway
        conn = await dial()
        self.connections[key] = (conn, token)
        return open_request(conn, authority)

    def drop(self, match: Callable[[object], bool]) -> None:
        for key in [k for k in self.connections if match(k)]:
            self.connections.pop(key)[0].close()
