"""HTTP/2 (RFC 9113) as HBONE uses it: `Connection`, an asyncio protocol under a TLS transport, and its
`Stream`s, each spliced to one TCP socket (`_AppSide`) or to a protocol of this process (`_InProcessApp`, the
waypoint's proxy: no socket pair in between): the asyncio adapter around two parts sans I/O, the input side
(h2input.FrameReader, which cuts the input into checked frames and calls this connection back) and flow
control (h2flow.FlowControl: 4 MiB windows both ways, given back when half is used, a stream's only once its
socket has taken the data), with the streams, the output and the timers. Frames are built and parsed by
frames.py.

The input is cut into frames as it is decrypted: the payload of a DATA frame goes straight from the TLS
buffer to its stream's socket; on the way out a stream's socket is read into a buffer 9 bytes in, the DATA
frame header written in front, and the whole goes to TLS as one write: no copy in Python either way, and
the one buffer is the thread's (relay.scratch), not the connection's. FlowControl's answers become
WINDOW_UPDATEs and paused or resumed sockets here. Control frames wait to go out with the next frame
written, so a CONNECT leaves with the application's first bytes. A response other than 200 refuses the
stream (CONNECT, RFC 9113 §8.5). What HBONE does with the streams (authorization, dialing, pooling) is hbone.py's.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from dataclasses import dataclass

import hpack
import structlog

from noded.tunnel import frames as f
from noded.tunnel.frames import ErrorCode, H2Error
from noded.tunnel.h2flow import WINDOW, FlowControl
from noded.tunnel.h2input import FRAME, FrameReader
from noded.tunnel.relay import READ_SIZE, keep_alive, live, no_delay, scratch

log = structlog.get_logger("noded.tunnel.h2conn")

# WINDOW (h2flow.py): what we let the peer send per stream and per connection
# FRAME (h2input.py): the largest frame we take and DATA frame we send: one read of a stream's socket
LINGER = 10  # seconds a refused stream's socket waits for the application to end its side
MAX_STREAMS = 1000  # concurrent streams a client may open on one connection to us
POOL_IDLE = 300.0  # seconds a client connection is kept without a stream
TLS_READ = 2 * READ_SIZE  # more than one read of the TLS socket decrypts to: taken in one go
# What one peer may make a server hold (the bounds h2 servers keep; beyond: GOAWAY ENHANCE_YOUR_CALM)
MAX_EARLY_STREAM = 1024 * 1024  # bytes a stream holds while its application socket is being dialed
MAX_EARLY = 8 * 1024 * 1024  # the same, all streams of a connection together
# streams the peer resets before they are answered (or opens while too many dials are pending), per
# RESET_WINDOW: the "rapid reset" class
MAX_RESETS = 200
RESET_WINDOW = 10.0
SERVER_IDLE = POOL_IDLE + 60  # seconds a server connection is kept without a stream (the client releases first)


REFUSALS: collections.Counter[str] = collections.Counter()  # peers this process ended, by why (noded status)


class StreamsExhausted(Exception):
    """The connection takes no new stream (the peer's limit, or no stream ID left, or GOAWAY)."""


class Stream:
    """One CONNECT stream. Until a socket is attached, what it receives waits here (bounded by its window)."""

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.windows = conn.flow.stream(stream_id)
        self.app: _AppSide | None = None
        self.sock: socket.socket | None = None  # the socket it is spliced to, until its transport is made
        self.early: list[bytes] = []
        self.early_bytes = 0  # in `early`: counted against the connection's MAX_EARLY
        self.received = False  # any data at all
        self.bytes_in = self.bytes_out = 0
        self.remote_ended = False  # the peer sent END_STREAM
        self.local_ended = False
        self.closed = False
        self.refused = False
        self.response: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def credit(self) -> int:
        return self.conn.flow.credit(self.windows)

    def release_early(self) -> None:
        self.conn.early -= self.early_bytes
        self.early_bytes = 0
        self.early.clear()

    def hand_to(self, app: _AppSide | _InProcessApp) -> bool:
        """The application side is there: what waited for it goes to its transport (or, the stream being
        gone already, it is ended); whether the stream goes on."""
        self.app = app
        self.sock = None
        if self.closed:
            if self.refused:
                app.end_refused()
            else:
                app.transport.abort()
            return False
        for data in self.early:
            app.transport.write(data)
        self.release_early()
        if self.remote_ended:
            app.transport.write_eof()
        self.conn.give_back(self)
        return True

    def fail(self, why: str) -> None:
        """No response will come: whoever awaits it gets the error (on the server side nobody does)."""
        if not self.response.done():
            self.response.set_exception(ConnectionResetError(why))
            self.response.exception()  # retrieved: no "never retrieved" warning where nobody waits

    async def attach_protocol(self, protocol: asyncio.Protocol, attached: Callable[[], None] | None = None) -> None:
        """Splice the stream to a protocol of this process, no socket in between (the waypoint's HTTP
        proxy): what the stream receives is its data_received, what it writes leaves as DATA frames."""
        _InProcessApp(self, protocol).start()
        if attached is not None:
            attached()
        await self.finished

    async def attach(self, sock: socket.socket, attached: Callable[[], None] | None = None) -> None:
        """Splice the stream to a connected socket until both directions have ended; `attached()` runs once
        the socket has what the stream received so far. Until its transport is made, what the stream
        receives is sent on the socket itself (nothing waits for a round of the loop)."""
        self.sock = sock
        await asyncio.get_running_loop().connect_accepted_socket(lambda: _AppSide(self), sock)
        if attached is not None:
            attached()
        await self.finished

    def send_first(self, sock: socket.socket) -> None:
        """What the application has sent already, out at once as DATA (with the CONNECT, in one write)."""
        self.sock = sock
        size = min(FRAME, self.conn.max_send_frame, self.credit)
        if size <= 0:
            return
        buf = scratch(9 + FRAME)
        try:
            n = sock.recv_into(buf[9 : 9 + size])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # its transport will see the error
        if n:
            self.conn.send_data(self, buf, n)
        else:
            self.conn.end_stream(self)

    # -- from the connection ---------------------------------------------------------------
    def receive(self, data: memoryview) -> None:
        app = self.app
        if app is not None and app.transport is not None:
            if not app.transport.is_closing():
                app.transport.write(data)  # sends at once; what the kernel did not take is copied
        elif not self.closed:
            sent = 0
            if self.sock is not None and not self.early:
                try:
                    sent = self.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    sent = len(data)  # the socket is gone: its transport will say so
            if sent < len(data):
                self.early.append(bytes(data[sent:]))
                self.early_bytes += len(data) - sent
                self.conn.hold_early(self, len(data) - sent)
        self.conn.flow.delivered(self.windows, len(data))
        self.bytes_in += len(data)
        self.received = True

    def ended_by_peer(self) -> None:
        self.remote_ended = True
        self.fail("HBONE stream ended without an answer")
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
        self.release_early()
        self.conn.forget(self.id)
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
        if not stream.hand_to(self):
            return
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
        self.stream.conn.give_back(self.stream)  # the window it held back

    def connection_lost(self, exc: Exception | None) -> None:
        stream = self.stream
        if not stream.closed and not (stream.local_ended and stream.remote_ended):
            stream.conn.reset(stream)
        stream.conn.forget(stream.id)
        if not stream.finished.done():
            stream.finished.set_result(None)


@dataclass
class InProcess:
    """What a server's dial gives instead of a socket when the stream ends in this process."""

    protocol: asyncio.Protocol


class _InProcessApp:
    """A stream's application inside this process. The connection drives `transport` as it drives an
    application socket's transport (write delivers to the protocol, pause_reading holds back what the
    protocol sends); the protocol writes to `outbound`, a transport whose bytes leave as DATA frames within
    the stream's and the connection's windows (held in `pending` while there is no credit, the protocol
    paused past PENDING_HIGH). `write_paused`: the protocol asked for no more data, so the stream's window
    is not given back and the peer stops."""

    PENDING_HIGH = 256 * 1024

    def __init__(self, stream: Stream, protocol: asyncio.Protocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.transport = _Delivery(self)
        self.outbound = _Outbound(self)
        self.write_paused = False
        self.eof = False
        self.done = False

    def start(self) -> None:
        self.protocol.connection_made(self.outbound)
        self.stream.hand_to(self)

    def end_refused(self) -> None:
        self.finish(None)

    def finish(self, exc: Exception | None) -> None:
        """The application side is over: the protocol told, the stream reset if it did not end both ways."""
        if self.done:
            return
        self.done = True
        stream = self.stream
        if not stream.closed and not (stream.local_ended and stream.remote_ended):
            stream.conn.reset(stream)
        stream.conn.forget(stream.id)
        self.protocol.connection_lost(exc)
        if not stream.finished.done():
            stream.finished.set_result(None)


class _Delivery:
    """The connection's side of an in-process application (see _InProcessApp)."""

    def __init__(self, app: _InProcessApp) -> None:
        self.app = app

    def write(self, data: bytes | memoryview) -> None:
        if not self.app.done:
            self.app.protocol.data_received(bytes(data))

    def write_eof(self) -> None:
        if not self.app.done and not self.app.protocol.eof_received():
            self.app.outbound.close()

    def close(self) -> None:
        self.app.finish(None)

    def abort(self) -> None:
        self.app.finish(ConnectionResetError("HBONE stream reset"))

    def is_closing(self) -> bool:
        return self.app.done

    def pause_reading(self) -> None:  # no credit: what the protocol writes waits
        self.app.outbound.paused = True

    def resume_reading(self) -> None:
        self.app.outbound.paused = False
        self.app.outbound.send()


class _Outbound(asyncio.Transport):
    """The transport an in-process application writes to (see _InProcessApp)."""

    def __init__(self, app: _InProcessApp) -> None:
        super().__init__()
        self.app = app
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_bytes = 0
        self.paused = False  # no credit
        self.protocol_paused = False
        self.eof_pending = False
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.app.done or not data:
            return
        self.pending.append(bytes(data))
        self.pending_bytes += len(data)
        self.send()
        if self.pending_bytes > _InProcessApp.PENDING_HIGH and not self.protocol_paused:
            self.protocol_paused = True
            self.app.protocol.pause_writing()

    def send(self) -> None:
        stream = self.app.stream
        conn = stream.conn
        while self.pending and not self.paused and not self.app.done and not stream.closed:
            size = min(FRAME, conn.max_send_frame, stream.credit)
            if size <= 0:
                self.paused = True
                break
            data = self.pending.popleft()
            piece, rest = data[:size], data[size:]
            if rest:
                self.pending.appendleft(rest)
            self.pending_bytes -= len(piece)
            buf = scratch(9 + FRAME)
            buf[9 : 9 + len(piece)] = piece
            conn.send_data(stream, buf, len(piece))
        if not self.pending:
            if self.protocol_paused:
                self.protocol_paused = False
                self.app.protocol.resume_writing()
            if self.eof_pending:
                self.eof_pending = False
                conn.end_stream(stream)
                if self.closing:
                    self.app.finish(None)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.app.done:
            return
        self.app.eof = True
        self.eof_pending = True
        self.send()

    def close(self) -> None:
        if self.closing or self.app.done:
            return
        self.closing = True
        self.write_eof()

    def abort(self) -> None:
        self.pending.clear()
        self.app.finish(ConnectionAbortedError("aborted"))

    def is_closing(self) -> bool:
        return self.closing or self.app.done

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:  # the protocol takes no more: its window is held back
        self.app.write_paused = True

    def resume_reading(self) -> None:
        self.app.write_paused = False
        if not self.app.done:
            self.app.stream.conn.give_back(self.app.stream)

    def is_reading(self) -> bool:
        return not self.app.write_paused

    def get_write_buffer_size(self) -> int:
        return self.pending_bytes

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None


class Connection(asyncio.BufferedProtocol):
    """One HBONE connection (client or server side) under its TLS transport; see the module doc."""

    def __init__(self, client: bool, on_request: Callable[[Stream, dict[str, str]], None] | None = None):
        self.client = client
        self.on_request = on_request
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.tasks: set[asyncio.Task] = set()
        self.decoder = hpack.Decoder()
        self.encoded_once = False  # our first header block carries the table size update
        self.next_id = 1  # the next stream a client opens
        self.last_peer_id = 0  # the highest stream the peer opened
        self.flow = FlowControl(WINDOW)  # the windows, both ways (sans I/O)
        self.peer_frame = f.DEFAULT_FRAME
        self.peer_streams = 2**31  # the peer's MAX_CONCURRENT_STREAMS
        self.closed = False  # no new streams (closed, or GOAWAY either way)
        self.retiring = False  # closes once its last stream is over
        self.idle: asyncio.TimerHandle | None = None  # a client connection without streams closes when it fires
        self.write_paused = False
        self.out: list[bytes] = []  # control frames waiting for the next write
        self.flush_later: asyncio.TimerHandle | None = None
        self.input = FrameReader(self, server=not client)  # the input side, sans I/O: calls the methods below
        self.data_stream: Stream | None = None  # the stream whose DATA payload is being passed through
        self.data_flags = 0
        self.early = 0  # bytes streams hold for applications not connected yet
        self.resets: list[float] = []  # when the peer reset a stream before it was answered (bounded)

    @property
    def max_send_frame(self) -> int:
        return self.peer_frame

    # -- transport side --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)
        keep_alive(transport)  # the node on the other end may vanish without a word
        ours = {f.INITIAL_WINDOW_SIZE: WINDOW, f.MAX_FRAME_SIZE: FRAME}
        ours.update({f.ENABLE_PUSH: 0} if self.client else {f.MAX_CONCURRENT_STREAMS: MAX_STREAMS})
        preface = f.PREFACE if self.client else b""
        self.flush(preface + f.settings(ours) + f.window_update(0, self.flow.opening_update()))
        if not self.client:  # a server connection nobody opens a stream on ends too
            self.idle = asyncio.get_running_loop().call_later(SERVER_IDLE, self._idle_end)

    def get_buffer(self, sizehint: int) -> memoryview:
        carry, need = self.input.carry, self.input.need
        view = scratch(len(carry) + max(TLS_READ, need))
        view[: len(carry)] = carry
        return view[len(carry) : len(carry) + max(TLS_READ, need - len(carry))]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.input.feed(scratch(0), len(self.input.carry) + nbytes)
        except (H2Error, hpack.HPACKError) as e:
            code = e.code if isinstance(e, H2Error) else ErrorCode.COMPRESSION_ERROR
            REFUSALS[ErrorCode(code).name] += 1
            log.info("HBONE protocol error", error=str(e))
            self.flush(f.goaway(self.last_peer_id, code, str(e).encode()[:200]))
            self.transport.close()
            return
        if self.out:
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
        for timer in (self.flush_later, self.idle):
            if timer is not None:
                timer.cancel()
        log.debug("HBONE connection ended", error=repr(exc) if exc else None)
        for stream in list(self.streams.values()):
            stream.close("HBONE connection closed")

    # -- input: FrameReader's calls (h2input.FrameHandler) --------------------------------------------
    def headers(self, stream_id: int, flags: int, block: bytes) -> None:
        fields = dict(self.decoder.decode(block))  # always decoded: the peer's HPACK table moves on
        stream = self.streams.get(stream_id)
        if stream is not None:
            if self.client and not stream.response.done() and not fields.get(":status", "").startswith("1"):
                stream.response.set_result(fields)
                if fields.get(":status") != "200":  # refused: what was sent early goes nowhere
                    stream.close(f"HBONE CONNECT refused with status {fields.get(':status')}", refused=True)
                    return
            if flags & f.END_STREAM:  # the end, or trailers
                stream.ended_by_peer()
        elif self.client:
            return  # a stream we no longer carry
        elif stream_id % 2 == 0:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"client opened even stream {stream_id}")
        elif stream_id <= self.last_peer_id:
            self.out.append(f.rst_stream(stream_id, ErrorCode.STREAM_CLOSED))
        else:
            self.last_peer_id = stream_id
            if len(self.streams) >= MAX_STREAMS or self.closed or self.on_request is None:
                self.out.append(f.rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
                return
            stream = self.add(stream_id)
            if flags & f.END_STREAM:
                stream.remote_ended = True
            self.on_request(stream, fields)

    def count_reset(self) -> None:
        """The HTTP/2 "rapid reset" class: streams opened and reset at once cost a dial each."""
        now = asyncio.get_running_loop().time()
        self.resets = [t for t in self.resets if now - t < RESET_WINDOW]
        self.resets.append(now)
        if len(self.resets) > MAX_RESETS:
            raise H2Error(ErrorCode.ENHANCE_YOUR_CALM, f"over {MAX_RESETS} streams reset in {RESET_WINDOW:.0f} s")

    def hold_early(self, stream: Stream, nbytes: int) -> None:
        """A stream holds nbytes more for an application not connected yet: past the bounds, the stream is
        reset (its own) or the connection ends (all of them together)."""
        self.early += nbytes
        if self.early > MAX_EARLY:
            log.info("HBONE peer sent too much before its connections were up", held=self.early)
            REFUSALS["ENHANCE_YOUR_CALM"] += 1
            self.flush(f.goaway(self.last_peer_id, ErrorCode.ENHANCE_YOUR_CALM, b"too much data held"))
            self.transport.close()
        elif stream.early_bytes > MAX_EARLY_STREAM:
            self.reset(stream, ErrorCode.ENHANCE_YOUR_CALM)

    def ping(self, payload: bytes) -> None:
        self.out.append(f.frame(f.PING, f.ACK, 0, payload))

    def rst_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            if not self.client and stream.app is None:  # reset before it was answered: counted
                self.count_reset()
            stream.close("HBONE stream reset")

    def settings(self, pairs: list[tuple[int, int]]) -> None:
        for key, value in pairs:
            if key == f.INITIAL_WINDOW_SIZE:
                self.flow.peer_initial_window(value, [stream.windows for stream in self.streams.values()])
            elif key == f.MAX_FRAME_SIZE:
                self.peer_frame = value
            elif key == f.MAX_CONCURRENT_STREAMS:
                self.peer_streams = value
        self._resume_senders()
        self.out.append(f.frame(f.SETTINGS, f.ACK, 0))

    def goaway(self, last_id: int, code: int) -> None:
        self.closed = True  # no new streams here; ours above last_id were never taken
        for stream in [s for i, s in self.streams.items() if i > last_id and (i % 2 == 1) == self.client]:
            stream.close("HBONE connection going away")
        if code:
            known = code in ErrorCode._value2member_map_  # `int in ErrorCode` raises TypeError on Python 3.11
            log.info("HBONE connection ended by the peer", error=ErrorCode(code).name if known else code)
            self.transport.close()

    def data_start(self, stream_id: int, length: int, flags: int, pad: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.remote_ended:
            stream = None  # a stream the peer had ended: dropped (its window is given back to the connection)
        padding = 1 + pad if flags & f.PADDED else 0
        self.flow.data_arrives(stream.windows if stream is not None else None, length, padding)
        self.data_stream, self.data_flags = stream, flags

    def data(self, payload: memoryview) -> None:
        if self.data_stream is not None:
            self.data_stream.receive(payload)

    def data_done(self) -> None:
        stream, flags = self.data_stream, self.data_flags
        self.data_stream = None
        if stream is not None and flags & f.END_STREAM:
            stream.ended_by_peer()
        self.ack(stream)

    def window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self.flow.connection_update(increment)
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            if not self.flow.stream_update(stream.windows, increment):
                self.reset(stream, ErrorCode.FLOW_CONTROL_ERROR)
                return
        self._resume_senders()

    # -- output ------------------------------------------------------------------------------
    def flush(self, *frames: bytes | memoryview) -> None:
        """The control frames waiting, then `frames`, in one write to TLS (one send for all)."""
        if self.flush_later is not None:
            self.flush_later.cancel()
            self.flush_later = None
        chunks = [*self.out, *frames] if self.out else frames
        self.out = []
        if chunks and live(self.transport):
            self.transport.writelines(chunks)

    def flush_soon(self, delay: float = 0.0) -> None:
        """Let the control frames go with the next frame written, or after `delay` at the latest: a CONNECT
        goes with the first data the application has already sent (a delay of 0 is still after this round's
        reads), a 200 with the application's first answer."""
        if self.flush_later is None:
            self.flush_later = asyncio.get_running_loop().call_later(delay, self.flush)

    def send_headers(self, stream_id: int, fields: list[tuple[str, str]], end_stream: bool = False) -> None:
        block = f.header_block(fields, first=not self.encoded_once)
        self.encoded_once = True
        self.out.append(f.headers(stream_id, block, end_stream, self.peer_frame))

    def send_data(self, stream: Stream, view: memoryview, nbytes: int) -> None:
        """The DATA frame whose payload is view[9:9 + nbytes] (the header goes in front of it)."""
        if stream.closed or stream.local_ended or not live(self.transport):
            return
        f.header(view, nbytes, f.DATA, 0, stream.id)
        self.flush(view[: 9 + nbytes])  # after the control frames waiting; encrypted at once: the buffer is free
        self.flow.sent(stream.windows, nbytes)
        stream.bytes_out += nbytes
        if self.flow.send <= 0:
            for other in self.streams.values():
                if other.app is not None and other.app.transport is not None:
                    other.app.transport.pause_reading()
        elif stream.windows.send <= 0 and stream.app is not None:
            stream.app.transport.pause_reading()

    def _resume_senders(self) -> None:
        if self.write_paused or self.flow.send <= 0:
            return
        for stream in self.streams.values():
            app = stream.app
            if app is not None and live(app.transport) and stream.windows.send > 0 and not stream.local_ended:
                app.transport.resume_reading()

    def ack(self, stream: Stream | None) -> None:
        """Give back the window the peer used (h2flow.FlowControl.due): a stream's only while its socket keeps
        up."""
        if stream is None:
            updates = self.flow.due(None, False, False)
        else:
            keeping_up = stream.app is not None and not stream.app.write_paused
            updates = self.flow.due(stream.windows, not stream.remote_ended, keeping_up)
        self.out += [f.window_update(stream_id, increment) for stream_id, increment in updates]

    def give_back(self, stream: Stream) -> None:
        """ack() outside the reading of input (which flushes when it is done): out at once."""
        self.ack(stream)
        if self.out:
            self.flush()

    def end_stream(self, stream: Stream) -> None:
        if stream.local_ended or stream.closed:
            return
        stream.local_ended = True
        self.flush(f.end_stream(stream.id))
        if stream.remote_ended:
            self.forget(stream.id)

    def reset(self, stream: Stream, code: ErrorCode = ErrorCode.CANCEL) -> None:
        if not stream.closed:
            self.flush(f.rst_stream(stream.id, code))
        stream.close("HBONE stream reset")

    def add(self, stream_id: int) -> Stream:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        stream = self.streams[stream_id] = Stream(self, stream_id)
        return stream

    def forget(self, stream_id: int) -> None:
        """A stream is over; a retiring connection closes with its last one, a client's after POOL_IDLE
        seconds without one (as ztunnel releases unused pooled connections)."""
        self.streams.pop(stream_id, None)
        if self.streams:
            return
        if self.retiring:
            self.close()
        elif self.idle is None and live(self.transport):
            wait = POOL_IDLE if self.client else SERVER_IDLE
            self.idle = asyncio.get_running_loop().call_later(wait, self._idle_end)

    def _idle_end(self) -> None:
        self.idle = None
        if not self.streams:
            log.debug("HBONE connection unused: closed")
            self.close()

    def retire(self) -> None:
        """No new streams; the ones it carries go on, and it closes once they are over."""
        self.closed = self.retiring = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        if live(self.transport):
            self.flush(f.goaway(self.last_peer_id, ErrorCode.NO_ERROR))
            self.transport.close()
        self.closed = True
