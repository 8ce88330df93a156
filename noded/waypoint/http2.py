"""The waypoint's HTTP/2 side: cleartext HTTP/2 with prior knowledge (h2c, what gRPC clients speak) on the
`h2` library's sans-IO connections, one downstream connection and one pooled upstream connection per
backend, streams forwarded one to one.

Each request stream gets what an HTTP/1.1 request gets in http1.py (request ID, forwarding headers, the L7
policy, the route's choice and header changes, the access log line and metrics, with `grpc-status` from the
trailers), then a stream on the backend's HTTP/2 connection: headers, DATA and trailers forwarded both ways
as they come. Flow control is end to end: DATA is acknowledged to its sender only once the other side's
window took it (what waits is bounded by the windows), so a slow reader slows its own stream only. A reset
on either side resets the other. A refusal is answered on the stream (403 `RBAC: access denied`, which
gRPC reads as PERMISSION_DENIED). Retries are not made for HTTP/2 (a stream may have carried data already);
the rule's request timeout resets the backend stream and answers 504 if no headers went out yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from noded.tunnel.policy import Request
from noded.waypoint.http1 import (
    IDLE_CLIENT,
    READ,
    RESET,
    Context,
    Decision,
    ProxyError,
    RequestRecord,
    new_request_id,
    parse_query,
)

MAX_STREAMS = 256  # concurrent streams a client may open through the waypoint on one connection
WINDOW = 1 << 20
CONNECTION_HEADERS = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"))


def _config(client: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client, header_encoding="utf-8", validate_inbound_headers=True)


class _Side:
    """One h2 connection and the stream writer under it."""

    def __init__(self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer
        self.pipes: dict[int, _Pipe] = {}  # stream -> what is sent on it (to wake on WINDOW_UPDATE)

    def reset(self, stream_id: int, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.CANCEL) -> None:
        """RST_STREAM, out at once; a stream that is already gone is left alone."""
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(stream_id, code)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def window_updated(self, stream_id: int) -> None:
        pipes = self.pipes.values() if stream_id == 0 else [p for p in (self.pipes.get(stream_id),) if p]
        for pipe in list(pipes):
            pipe.pump()


class _Pipe:
    """DATA of one stream (src side, src stream) to another (dst side, dst stream): sent within dst's
    windows, acknowledged to src as sent; then the end (or trailers)."""

    def __init__(self, src: _Side, src_id: int, dst: _Side, dst_id: int) -> None:
        self.src, self.src_id, self.dst, self.dst_id = src, src_id, dst, dst_id
        self.pending: deque[bytes] = deque()
        self.end: list[tuple[str, str]] | bool = False  # True: END_STREAM; a list: trailers then the end
        self.done = False
        self.bytes = 0
        self.owed = 0  # padding received: given back with the next acknowledgement
        dst.pipes[dst_id] = self

    def data(self, data: bytes, flow_controlled: int) -> None:
        if self.done:
            self._ack(flow_controlled)
            return
        self.pending.append(data)
        self.bytes += len(data)
        self.owed += flow_controlled - len(data)
        self.pump()

    def finish(self, trailers: list[tuple[str, str]] | None = None) -> None:
        self.end = trailers if trailers else True
        self.pump()

    def pump(self) -> None:
        conn = self.dst.conn
        try:
            while self.pending and not self.done:
                window = min(conn.local_flow_control_window(self.dst_id), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                data = self.pending.popleft()
                piece, rest = data[:window], data[window:]
                if rest:
                    self.pending.appendleft(rest)
                conn.send_data(self.dst_id, piece)
                self._ack(len(piece))
            if not self.pending and self.end is not False and not self.done:
                if isinstance(self.end, list):
                    conn.send_headers(self.dst_id, self.end, end_stream=True)
                else:
                    conn.end_stream(self.dst_id)
                self.done = True
                self.dst.pipes.pop(self.dst_id, None)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.close()
        self.dst.flush()
        self.src.flush()

    def _ack(self, n: int) -> None:
        owed, self.owed = self.owed, 0
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.src.conn.acknowledge_received_data(n + owed, self.src_id)

    def close(self) -> None:
        self.done = True
        self.pending.clear()
        self.dst.pipes.pop(self.dst_id, None)


class _Upstream:
    """An HTTP/2 connection to one backend, multiplexing the waypoint's streams to it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.side = _Side(h2.connection.H2Connection(_config(True)), writer)
        self.side.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.side.conn.initiate_connection()
        self.side.flush()
        self.handlers: dict[int, Callable[[h2.events.Event], None]] = {}
        self.closed = False
        self.task = asyncio.ensure_future(self._read())

    def usable(self) -> bool:
        conn = self.side.conn
        return not self.closed and conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams

    def open(self, headers: list[tuple[str, str]], end: bool, handler: Callable[[h2.events.Event], None]) -> int:
        conn = self.side.conn
        stream_id = conn.get_next_available_stream_id()
        self.handlers[stream_id] = handler
        conn.send_headers(stream_id, headers, end_stream=end)
        self.side.flush()
        return stream_id

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(READ):
                events = self.side.conn.receive_data(data)
                for event in events:
                    stream_id = getattr(event, "stream_id", 0)
                    if isinstance(event, h2.events.WindowUpdated):
                        self.side.window_updated(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.closed = True
                    handler = self.handlers.get(stream_id) if stream_id else None
                    if handler is not None:
                        handler(event)
                        if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                            self.handlers.pop(stream_id, None)
                self.side.flush()
        except (h2.exceptions.ProtocolError, ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            for handler in list(self.handlers.values()):
                handler(h2.events.StreamReset())
            self.handlers.clear()
            self.side.writer.close()


class Http2Proxy:
    """HTTP/2 through the waypoint, with the HTTP/1.1 proxy's policy, routing and telemetry (`proxy`)."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy  # http1.Proxy: its upstream (policy, routes, connections) and on_request
        self.upstreams: dict[tuple[str, int, str], _Upstream] = {}

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: Context, first: bytes
    ) -> None:
        conn = h2.connection.H2Connection(_config(False))
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            },
        )
        conn.initiate_connection()
        down = _Side(conn, writer)
        down.flush()
        streams: dict[int, Callable[[h2.events.Event], None]] = {}
        tasks: set[asyncio.Task] = set()
        opened: list[tuple[_Upstream, int]] = []  # backend streams this connection opened
        data = first
        try:
            while data:
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    down.flush()  # the GOAWAY h2 wrote
                    return
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        handler = self._stream(down, event, ctx, tasks, opened)
                        if handler is not None:
                            streams[event.stream_id] = handler
                    elif isinstance(event, h2.events.WindowUpdated):
                        down.window_updated(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                    elif (handler := streams.get(getattr(event, "stream_id", 0))) is not None:
                        handler(event)
                        if isinstance(event, h2.events.StreamReset):
                            streams.pop(event.stream_id, None)
                down.flush()
                await writer.drain()
                if conn.open_inbound_streams == 0:  # no stream open: the connection is idle, and may time out
                    self.proxy.expect(writer, IDLE_CLIENT)
                data = await reader.read(READ)
                self.proxy.expected(writer)
        finally:
            for task in tasks:
                task.cancel()
            for upstream, stream_id in opened:  # the client is gone: what it still had open is cancelled
                if upstream.side.conn.streams.get(stream_id) is not None and not upstream.closed:
                    upstream.side.reset(stream_id)

    def _stream(
        self, down: _Side, event: h2.events.RequestReceived, ctx: Context, tasks: set, opened: list
    ) -> Callable | None:
        """A request stream: decided at once; its later events go to the handler returned."""
        started = time.monotonic()
        sid = event.stream_id
        fields = [(n, v) for n, v in event.headers]
        pseudo = {n: v for n, v in fields if n.startswith(":")}
        headers = {}
        for n, v in fields:
            if not n.startswith(":"):
                headers.setdefault(n, v)
        raw_path = pseudo.get(":path", "/")
        path, _, query_text = raw_path.partition("?")
        query = parse_query(query_text)
        authority = pseudo.get(":authority") or headers.get("host", "")
        request = Request(pseudo.get(":method", ""), authority, path, headers)
        request_id = headers.get("x-request-id") or new_request_id()
        record = RequestRecord(request.method, authority, raw_path, 0, 0.0, request_id, ctx)
        ended = event.stream_ended is not None
        state = {"up": None, "upstream": None, "request_pipe": None, "response_pipe": None, "headers_sent": False}

        def done(status: int | None = None, flags: str = "-", grpc: str | None = None) -> None:
            if record.status:
                return
            record.status = status or record.status or 0
            record.flags = flags
            record.grpc_status = grpc
            record.duration_ms = (time.monotonic() - started) * 1000
            if state["request_pipe"] is not None:
                record.request_bytes = state["request_pipe"].bytes
            if state["response_pipe"] is not None:
                record.response_bytes = state["response_pipe"].bytes
            if record.status:
                self.proxy.on_request(record)

        def answer(status: int, body: str, flags: str = "-") -> None:
            data = body.encode()
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                down.conn.send_headers(
                    sid, [(":status", str(status)), ("content-type", "text/plain"), ("content-length", str(len(data)))]
                )
                down.conn.send_data(sid, data, end_stream=True)
            down.flush()
            record.response_bytes = len(data)
            done(status, flags)

        try:
            decision: Decision = self.proxy.decide(ctx, request, query, record)
        except ProxyError as e:
            answer(e.status, e.body, e.flags)
            if not ended:
                down.reset(sid, h2.errors.ErrorCodes.NO_ERROR)
            return None

        forwarded = self.proxy._forward_headers(list(headers.items()), request, request_id, ctx, decision)
        out = [
            (":method", request.method),
            (":scheme", pseudo.get(":scheme", "http")),
            (":authority", authority),
            (":path", raw_path),
        ]
        out += [(n.lower(), v) for n, v in forwarded if n.lower() not in CONNECTION_HEADERS]
        if headers.get("te") == "trailers":
            out.append(("te", "trailers"))
        early: list[h2.events.Event] = []  # what the client sent while the backend connection was made

        def on_response(ev: h2.events.Event) -> None:
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(":status", "0")
                kept = [(n, v) for n, v in ev.headers if not n.startswith(":") and n not in CONNECTION_HEADERS]
                kept = [(n.lower(), v) for n, v in decision.response_headers(kept)]
                with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    down.conn.send_headers(sid, [(":status", status), *kept], end_stream=ev.stream_ended is not None)
                state["headers_sent"] = True
                state["status"] = int(status) if status.isdigit() else 0
                up = state["upstream"]
                state["response_pipe"] = _Pipe(up.side, state["up"], down, sid)
                if ev.stream_ended is not None:  # headers only (a gRPC trailers-only answer among them)
                    state["response_pipe"].done = True
                    done(state["status"], grpc=dict(ev.headers).get("grpc-status"))
                down.flush()
            elif isinstance(ev, h2.events.DataReceived):
                if state["response_pipe"] is not None:
                    state["response_pipe"].data(ev.data, ev.flow_controlled_length)
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers = [(n, v) for n, v in ev.headers if not n.startswith(":")]
                grpc = dict(trailers).get("grpc-status")
                if state["response_pipe"] is not None:
                    state["response_pipe"].finish(trailers)
                done(state.get("status"), grpc=grpc)
            elif isinstance(ev, h2.events.StreamEnded):
                if state["response_pipe"] is not None and not state["response_pipe"].done:
                    state["response_pipe"].finish()
                done(state.get("status"))
            elif isinstance(ev, h2.events.StreamReset):
                if state["headers_sent"]:
                    down.reset(sid)
                    done(state.get("status"), "UR")
                else:
                    answer(503, f"{RESET}remote reset", "UR")

        async def start() -> None:
            try:
                upstream = await self._upstream(ctx, decision.address)
            except (OSError, TimeoutError) as e:
                answer(503, f"{RESET}connection failure, {e}", "UF")
                return
            state["upstream"] = upstream
            state["up"] = upstream.open(out, ended, on_response)
            opened.append((upstream, state["up"]))
            state["request_pipe"] = _Pipe(down, sid, upstream.side, state["up"])
            for ev in early:
                on_request(ev)
            early.clear()
            if decision.timeout:
                asyncio.get_running_loop().call_later(decision.timeout, timed_out)

        def timed_out() -> None:
            if record.status or (state.get("response_pipe") is not None and state["response_pipe"].done):
                return
            state["upstream"].side.reset(state["up"])
            if state["headers_sent"]:
                down.reset(sid)
                done(state.get("status"), "UT")
            else:
                answer(504, "upstream request timeout", "UT")

        def on_request(ev: h2.events.Event) -> None:
            if ended and isinstance(ev, h2.events.StreamEnded):
                return  # the request ended with its headers: the backend's stream was opened ended
            pipe = state["request_pipe"]
            if pipe is None:
                early.append(ev)
                return
            if isinstance(ev, h2.events.DataReceived):
                pipe.data(ev.data, ev.flow_controlled_length)
            elif isinstance(ev, h2.events.StreamEnded):
                pipe.finish()
            elif isinstance(ev, h2.events.TrailersReceived):
                pipe.finish([(n, v) for n, v in ev.headers if not n.startswith(":")])
            elif isinstance(ev, h2.events.StreamReset):
                pipe.close()
                state["upstream"].side.reset(state["up"])
                done(state.get("status") or 499, "DC")

        task = asyncio.ensure_future(start())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return on_request

    async def _upstream(self, ctx: Context, address: tuple[str, int]) -> _Upstream:
        key = (address[0], address[1], ctx.namespace)
        held = self.upstreams.get(key)
        if held is not None and held.usable():
            return held
        reader, writer = await self.proxy.upstream.connect(ctx, address)
        upstream = self.upstreams[key] = _Upstream(reader, writer)
        return upstream

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.side.writer.close()
        self.upstreams.clear()
