"""The waypoint's HTTP/1.1 proxy (a connection that starts with HTTP/2's preface goes to http2.py): one client
connection in, requests forwarded to the backends the routes
pick, L7 policy on each request. Parsing is llhttp's (httptools; 12× faster than h11 here, bench/waypoint.py).

Per request, in order: parsed (a malformed one is answered 400 and the connection closed; a body over
`MAX_BODY` 413), `x-request-id` added when absent (UUID4) and kept when present, `x-forwarded-for` appended
with the client's address and `x-forwarded-proto` set when absent, as Envoy does; the L7 AuthorizationPolicy
decides (403 `RBAC: access denied`, Envoy's body); the HTTPRoute's rule picks a backend by weight, its
request header changes apply; the request goes to a kept-alive connection to that backend and the response
comes back streamed (its header changes applied). Connect failures and the rule's retry codes (503 by
default) are retried on a fresh connection up to the rule's attempts; a rule's `timeouts.request` answers 504.
Pipelined requests are served one after the other, in order. `Upgrade` (WebSocket) is passed through: the
101 answer turns the connection into a byte splice both ways. Each request ends with one `RequestRecord`
handed to `on_request` (the access log and the metrics).

What the proxy needs from the daemon is in `Context` (who the client is, which Service it asked for) and in
`Upstream` (the policy decision, the route choice, and a connection to a backend address).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools
import structlog

from noded.tunnel.policy import Request

log = structlog.get_logger("noded.waypoint")

RESET = "upstream connect error or disconnect/reset before headers. reset reason: "  # Envoy's words
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # HTTP/2 with prior knowledge (h2c, gRPC) starts so
MAX_BODY = 1 << 20  # buffered request body (retries replay it), as Envoy's per-connection buffer limit
MAX_HEAD = 64 * 1024  # request or response head
MAX_HEADERS = 100
READ = 64 * 1024
MAX_IDLE_PER_BACKEND = 32
IDLE_TIMEOUT = 60.0  # a kept-alive backend connection unused so long is not reused
IDLE_CLIENT = 300.0  # seconds a client connection may stay idle between requests (then closed)
HEAD_TIMEOUT = 30.0  # seconds a client has to send a whole request head once begun (slowloris)
SWEEP = 1.0  # how often overdue clients are looked for
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)
HOP_BY_HOP_STR = frozenset(n.decode() for n in HOP_BY_HOP)
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ProxyError(Exception):
    """A request the proxy answers itself: status and Envoy's body for it."""

    def __init__(self, status: int, body: str, flags: str = "-") -> None:
        super().__init__(body)
        self.status, self.body, self.flags = status, body, flags


class ConnectFailed(OSError):
    """No connection to a backend could be made (retried like Envoy's connect-failure)."""


@dataclass
class Context:
    """One client connection through the waypoint."""

    client_ip: str
    principal: str | None  # the client's SPIFFE ID without the scheme, as the tunnel verified it
    namespace: str  # the Service's (and the waypoint's)
    service: str
    port: int
    waypoint: str  # the Gateway's name
    vip: str = ""  # the cluster IP the client asked for
    origin: object = None  # the daemon's: how backends are reached from where the connection came in


@dataclass(slots=True)
class Decision:
    """What the route gives one request: a backend address, or a status to answer."""

    address: tuple[str, int] | None = None
    backend: str = ""  # "ns/name:port" of the Service the rule chose
    status: int = 0
    body: str = ""
    request_headers: Callable[[list[tuple[str, str]]], list[tuple[str, str]]] = lambda h: h
    response_headers: Callable[[list[tuple[str, str]]], list[tuple[str, str]]] = lambda h: h
    timeout: float | None = None
    retries: int = 0
    retry_codes: tuple[int, ...] = ()
    route: str | None = None


class Upstream:
    """The daemon's side, injected: policy, routing, and connections to backends."""

    def authorize(self, ctx: Context, request: Request) -> tuple[bool, str | None]:
        raise NotImplementedError

    def route(self, ctx: Context, request: Request, query: dict[str, str]) -> Decision:
        raise NotImplementedError

    async def open(
        self, ctx: Context, address: tuple[str, int], factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        """A connection to a backend address with the protocol `factory` makes (loop.create_connection's
        contract); OSError or TimeoutError when none can be made."""
        raise NotImplementedError

    async def connect(
        self, ctx: Context, address: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The same as asyncio streams (HTTP/2 and upgrades)."""
        reader = asyncio.StreamReader(limit=READ)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await self.open(ctx, address, lambda: protocol)
        return reader, asyncio.StreamWriter(transport, protocol, reader, asyncio.get_running_loop())


@dataclass(slots=True)
class RequestRecord:
    method: str
    authority: str
    path: str
    status: int
    duration_ms: float
    request_id: str
    ctx: Context
    backend: str = ""
    address: tuple[str, int] | None = None  # the backend endpoint
    route: str | None = None
    flags: str = "-"  # Envoy's response flags: UF (connect failure), UT (timeout), NR (no route), UAEX (denied)
    request_bytes: int = 0
    response_bytes: int = 0
    attempts: int = 1
    policy: str | None = None
    grpc_status: str | None = None  # HTTP/2: the grpc-status the backend answered


@dataclass
class _Message:
    method: bytes = b""
    url: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    version: str = "1.1"
    keep_alive: bool = True
    upgrade: bool = False
    complete: bool = False
    too_big: bool = False


class _RequestParsing:
    """httptools callbacks collecting whole requests (bodies bounded)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Message | None = None
        self.done: deque[_Message] = deque()
        self.head_size = 0

    def on_message_begin(self) -> None:
        self.current = _Message()
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.current.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD:
            raise ProxyError(400, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD or len(self.current.headers) > MAX_HEADERS:
            raise ProxyError(400, "request head too large")

    def on_headers_complete(self) -> None:
        m, p = self.current, self.parser
        m.method, m.version, m.keep_alive, m.upgrade = (
            p.get_method(),
            p.get_http_version(),
            p.should_keep_alive(),
            p.should_upgrade(),
        )

    def on_body(self, body: bytes) -> None:
        if len(self.current.body) + len(body) > MAX_BODY:
            self.current.too_big = True
            return
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.complete = True
        self.done.append(self.current)
        self.current = None


class _ResponseParsing:
    """httptools callbacks for one backend response, handed on as it arrives (`reset` for the next)."""

    head_only = False  # the answer to a HEAD: complete at its head

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.chunks: list[bytes] = []
        self.head_size = 0
        self.keep_alive = False

    def on_status(self, _status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD or len(self.headers) > MAX_HEADERS:
            raise ProxyError(502, "upstream response head too large")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim answer (100 Continue): the client had ours already
            return
        self.status, self.head_done = status, True
        if self.head_only:  # a HEAD's answer has no body
            self.complete = True
            self.keep_alive = _header(self.headers, b"connection") != b"close"

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.chunks.append(bytes(body))

    def on_message_complete(self) -> None:
        if self.head_done and not self.complete:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the feed returns


_random = random.SystemRandom().getrandbits(64)  # a per-process seed for the request IDs' generator
_ids = random.Random(_random)


_UUID_KEEP = ~(0xF000 << 64) & ~(0xC000 << 48)  # all but the version and variant bits
_UUID_V4 = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> str:
    """A new x-request-id: a version 4 UUID (random bits, version and variant set), as Envoy makes them;
    from a seeded PRNG (an ID must be unique, not secret): a quarter of uuid.uuid4()'s cost here."""
    h = (_ids.getrandbits(128) & _UUID_KEEP | _UUID_V4).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens = set()
    for n, v in headers:
        if n.lower() == b"connection":
            tokens |= {t.strip().lower() for t in v.split(b",")}
    return tokens


def _answer(status: int, body: str, close: bool = False, extra: list[tuple[str, str]] = ()) -> bytes:
    data = body.encode()
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
        f"content-length: {len(data)}",
        "content-type: text/plain",
    ]
    head += [f"{n}: {v}" for n, v in extra]
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class Proxy:
    """The HTTP/1.1 side of the waypoint: `protocol(ctx)` is the asyncio protocol of one client connection.

    Requests and responses are handled in the protocols' callbacks (a request parsed in `data_received`
    goes out to its backend there; the response goes back to the client in the backend's), with no task
    or stream per connection: what costs a request here is its parsing, its policy and route, and the
    writes. A new backend connection is the one thing awaited. HTTP/2 with prior knowledge and upgrades
    switch the client connection to asyncio streams (http2.py, `_upgrade`)."""

    def __init__(self, upstream: Upstream, on_request: Callable[[RequestRecord], None] = lambda r: None) -> None:
        from noded.waypoint.http2 import Http2Proxy

        self.upstream = upstream
        self.on_request = on_request
        self.http2 = Http2Proxy(self)
        self.idle: dict[tuple[str, int, str], list[_BackendSide]] = {}
        self.deadlines: dict[object, float] = {}  # clients awaited (anything with close()), and until when
        self.sweeper: asyncio.TimerHandle | None = None
        self.active = 0
        self.tasks: set[asyncio.Task] = set()

    def protocol(self, ctx: Context) -> asyncio.Protocol:
        """The protocol for one client connection through the waypoint."""
        return _ClientSide(self, ctx)

    # -- client deadlines: one sweep a SWEEP seconds for every connection, not a timer per read ---------
    def expect(self, client: object, seconds: float) -> None:
        """The client must send something within `seconds`, or its connection is closed."""
        self.deadlines[client] = time.monotonic() + seconds
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def expected(self, client: object) -> None:
        self.deadlines.pop(client, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for client, deadline in list(self.deadlines.items()):
            if deadline <= now:
                del self.deadlines[client]
                client.close()
        self.sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep) if self.deadlines else None

    def spawn(self, coro: Awaitable[None], transport: asyncio.BaseTransport | None = None) -> None:
        """A task of the proxy's (a connection made, HTTP/2, an upgrade); `transport` closed when it ends."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)

        def ended(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            if transport is not None:
                transport.close()
            if not t.cancelled() and t.exception() is not None:
                log.warning("waypoint task failed", error=repr(t.exception()))

        task.add_done_callback(ended)

    # -- one request -----------------------------------------------------------------------------
    def _prepare(
        self, message: _Message, ctx: Context
    ) -> tuple[Request, dict[str, str], list[tuple[str, str]], RequestRecord]:
        """A parsed request as the policy and routes read it, its headers, and its record (request ID
        taken from the client or made)."""
        url = message.url.decode("latin-1")
        if url.startswith(("http://", "https://")):
            parsed = httptools.parse_url(bytes(message.url))
            url = (parsed.path or b"/").decode("latin-1")
            if parsed.query:
                url += "?" + parsed.query.decode("latin-1")
        path, _, query_text = url.partition("?")
        query = parse_query(query_text) if query_text else {}
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in message.headers]
        lowered: dict[str, str] = {}
        for n, v in headers:
            lowered.setdefault(n.lower(), v)
        request = Request(message.method.decode("latin-1"), lowered.get("host", ""), path, lowered)
        request_id = lowered.get("x-request-id") or new_request_id()
        return request, query, headers, RequestRecord(request.method, request.host, url, 0, 0.0, request_id, ctx)

    def decide(self, ctx: Context, request: Request, query: dict[str, str], record: RequestRecord) -> Decision:
        """The L7 policy, then the route, for one request (HTTP/1.1 or HTTP/2); what they chose goes into
        `record`. ProxyError when the request is answered here: 403 denied, or the route's status."""
        allowed, record.policy = self.upstream.authorize(ctx, request)
        if not allowed:
            raise ProxyError(403, "RBAC: access denied", "UAEX")
        decision = self.upstream.route(ctx, request, query)
        record.backend, record.route, record.address = decision.backend, decision.route, decision.address
        if decision.status:
            raise ProxyError(decision.status, decision.body, "NR" if decision.status == 404 else "-")
        return decision

    def _forward_headers(
        self, headers: list[tuple[str, str]], request: Request, request_id: str, ctx: Context, decision: Decision
    ) -> list[tuple[str, str]]:
        drop = {"content-length", "expect"}
        for n, v in headers:
            if n.lower() == "connection":
                drop.update(t.strip().lower() for t in v.split(","))
        out, xff = [], None
        for n, v in headers:
            low = n.lower()
            if low in HOP_BY_HOP_STR or low in drop:
                continue
            if low == "x-forwarded-for":
                xff = f"{xff}, {v}" if xff else v
                continue
            out.append((n, v))
        out.append(("x-forwarded-for", f"{xff}, {ctx.client_ip}" if xff else ctx.client_ip))
        if "x-forwarded-proto" not in request.headers:
            out.append(("x-forwarded-proto", "http"))
        if "x-request-id" not in request.headers:
            out.append(("x-request-id", request_id))
        return decision.request_headers(out)

    async def _upgrade(
        self, message: _Message, rest: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: Context
    ) -> None:
        """An Upgrade request (WebSocket): forwarded; a 101 turns both connections into a splice."""
        started = time.monotonic()
        request, query, headers, record = self._prepare(message, ctx)
        try:
            decision = self.decide(ctx, request, query, record)
            forwarded = self._forward_headers(headers, request, record.request_id, ctx, decision)
            upgrade = request.headers.get("upgrade", "")
            head = _request_head(record, forwarded) + f"connection: upgrade\r\nupgrade: {upgrade}\r\n\r\n"
            try:
                up_reader, up_writer = await self.upstream.connect(ctx, decision.address)
            except (OSError, TimeoutError):
                raise ProxyError(503, f"{RESET}connection failure", "UF") from None
            up_writer.write(head.encode("latin-1") + rest)
            response = _ResponseParsing()
            data = b""
            while not response.head_done:
                data = await up_reader.read(READ)
                if not data:
                    raise ProxyError(503, f"{RESET}connection termination", "UC")
                try:
                    response.parser.feed_data(data)
                except httptools.HttpParserUpgrade as e:
                    offset = e.args[0] if e.args else len(data)
                    response.head_done, response.status = True, response.parser.get_status_code()
                    data = data[offset:]
                    break
                else:
                    data = b""
            record.status = response.status
            head_out = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Switching Protocols')}"]
            head_out += [f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in response.headers]
            writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode("latin-1") + data + b"".join(response.chunks))
            if response.status != 101:
                up_writer.close()
                return
            record.duration_ms = (time.monotonic() - started) * 1000
            self.on_request(record)
            record = None
            await _splice(reader, writer, up_reader, up_writer)
        except ProxyError as e:
            record.status, record.flags = e.status, e.flags
            writer.write(_answer(e.status, e.body, close=True))
        finally:
            if record is not None:
                record.duration_ms = (time.monotonic() - started) * 1000
                if record.status:
                    self.on_request(record)
            await _drain(writer)

    # -- backend connections ---------------------------------------------------------------------
    def _idle_backend(self, key: tuple[str, int, str]) -> _BackendSide | None:
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            backend = idle.pop()
            if now - backend.since < IDLE_TIMEOUT and not backend.closed:
                return backend
            backend.close()
        return None

    def _keep_idle(self, backend: _BackendSide) -> None:
        idle = self.idle.setdefault(backend.key, [])
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            backend.close()
            return
        backend.since = time.monotonic()
        idle.append(backend)

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.http2.close()
        for idle in self.idle.values():
            for backend in idle:
                backend.close()
        self.idle.clear()
        for task in list(self.tasks):
            task.cancel()


class _ClientSide(asyncio.Protocol):
    """One client connection: requests parsed as they come, served one at a time and in order (pipelined
    ones wait, the connection's reading paused meanwhile)."""

    def __init__(self, proxy: Proxy, ctx: Context) -> None:
        self.proxy = proxy
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.parsing = _RequestParsing()
        self.first = b""  # what came before the protocol is known (the start of HTTP/2's preface?)
        self.known = False
        self.exchange: _Exchange | None = None  # the request being served
        self.inner: asyncio.StreamReaderProtocol | None = None  # HTTP/2 or an upgrade: streams from here on
        self.broken: tuple[int, str] | None = None  # a parse error, answered once what came before is served
        self.lingering = -1  # bytes dropped since the connection was refused; -1: not refused
        self.eof = False
        self.closing = False  # closed by us
        self.gone = False  # connection_lost
        self.reading_paused = False
        self.writing_paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.proxy.active += 1
        self.proxy.expect(self, HEAD_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.gone:
            return
        self.gone = True
        self.proxy.active -= 1
        self.proxy.expected(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)
        if self.exchange is not None:
            self.exchange.abandon()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        if self.lingering >= 0:
            self.lingering += len(data)
            if self.lingering > LINGER_BYTES:
                self.transport.close()
            return
        if self.broken is not None:
            return
        if not self.known:
            data = self.first + data
            if len(data) < len(PREFACE) and PREFACE.startswith(data):
                self.first = data
                return
            self.known, self.first = True, b""
            if data.startswith(PREFACE):
                self.proxy.expected(self)
                reader, writer = self._streams()
                self.proxy.spawn(self.proxy.http2.serve(reader, writer, self.ctx, data), self.transport)
                return
        self._feed(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        self.eof = True
        if self.exchange is None:
            self.transport.close()
        return True  # the response in flight still goes out

    def pause_writing(self) -> None:
        self._writable(False)

    def resume_writing(self) -> None:
        self._writable(True)

    def _writable(self, writable: bool) -> None:
        if self.inner is not None:
            (self.inner.resume_writing if writable else self.inner.pause_writing)()
            return
        self.writing_paused = not writable
        if self.exchange is not None and self.exchange.backend is not None:
            self.exchange.backend.pause(not writable)  # the response waits in the backend's socket

    def close(self) -> None:
        """The deadline sweep's: the client took too long."""
        self.transport.close()

    # -- requests --------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        parsing = self.parsing
        self.proxy.expected(self)
        try:
            parsing.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[e.args[0] :] if e.args else b""
            if parsing.current is not None and not parsing.current.complete:
                parsing.on_message_complete()  # an upgrade request ends at its head
            message = parsing.done.pop()
            if parsing.done or self.exchange is not None:  # pipelined before an upgrade: not served
                self.broken = (400, "Bad Request")
            else:
                reader, writer = self._streams()
                self.proxy.spawn(self.proxy._upgrade(message, rest, reader, writer, self.ctx), self.transport)
                return
        except (httptools.HttpParserError, ProxyError, ValueError):
            self.broken = (400, "Bad Request")
        if self.exchange is not None:
            if parsing.done and not self.reading_paused:  # pipelined: read no more until it is served
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._next()

    def _next(self) -> None:
        """Serve what is parsed, in order; then wait for the client (with a deadline)."""
        parsing = self.parsing
        while parsing.done:
            if self.gone or self.closing or self.lingering >= 0:
                return
            message = parsing.done.popleft()
            if message.too_big:
                self._refuse(413, "Payload Too Large")
                return
            if self._start(message):
                return  # its response comes back in the backend's callbacks
        if self.gone or self.closing or self.lingering >= 0:
            return
        if self.broken is not None:
            self._refuse(*self.broken)
            return
        if self.eof:
            self.transport.close()
            return
        current = parsing.current
        if current is not None and current.too_big:
            self._refuse(413, "Payload Too Large")
            return
        if current is not None and _expects_continue(current):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        # a client is given so long between requests, and to finish a request it began
        self.proxy.expect(self, IDLE_CLIENT if current is None else HEAD_TIMEOUT)

    def _start(self, message: _Message) -> bool:
        """One request: answered here (False), or on its way to a backend (True)."""
        started = time.monotonic()
        proxy, ctx = self.proxy, self.ctx
        request, query, headers, record = proxy._prepare(message, ctx)
        record.request_bytes = len(message.body)
        try:
            decision = proxy.decide(ctx, request, query, record)
        except ProxyError as e:
            record.status, record.flags, record.response_bytes = e.status, e.flags, len(e.body)
            self.transport.write(_answer(e.status, e.body, close=not message.keep_alive))
            record.duration_ms = (time.monotonic() - started) * 1000
            proxy.on_request(record)
            if not message.keep_alive:
                self.closing = True
                self.transport.close()
            return False
        forwarded = proxy._forward_headers(headers, request, record.request_id, ctx, decision)
        head = _request_head(record, forwarded)
        body = message.body
        if body or request.method in ("POST", "PUT", "PATCH"):
            head += f"content-length: {len(body)}\r\n\r\n"
        else:
            head += "\r\n"
        payload = head.encode("latin-1") + bytes(body) if body else head.encode("latin-1")
        self.exchange = _Exchange(self, payload, message.keep_alive, decision, record, started)
        self.exchange.attempt()
        return True

    def finished(self, keep: bool) -> None:
        """The exchange in flight is over: the next request, or the connection closed."""
        self.exchange = None
        if self.gone or self.closing:
            return
        if not keep:
            self.closing = True
            self.transport.close()
            return
        self._next()

    def _refuse(self, status: int, body: str) -> None:
        """Answer and close as a lingering close does: our side shut, what the client still sends read and
        dropped for a while (LINGER seconds, LINGER_BYTES), so its kernel does not reset the answer away."""
        self.proxy.expected(self)
        self.transport.write(_answer(status, body, close=True))
        with contextlib.suppress(OSError, RuntimeError):
            if self.transport.can_write_eof():
                self.transport.write_eof()
        self.lingering = 0
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER, self.transport.close)

    def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """This connection as asyncio streams from now on (HTTP/2, an upgrade)."""
        reader = asyncio.StreamReader(limit=READ)
        inner = asyncio.StreamReaderProtocol(reader)
        inner.connection_made(self.transport)
        self.inner = inner
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        return reader, asyncio.StreamWriter(self.transport, inner, reader, asyncio.get_running_loop())


class _Exchange:
    """One request and its response: attempts (a kept-alive backend connection, else a new one), retries,
    the route's timeout, and the response streamed to the client as it comes."""

    def __init__(
        self,
        client: _ClientSide,
        payload: bytes,
        keep: bool,
        decision: Decision,
        record: RequestRecord,
        started: float,
    ) -> None:
        self.client = client
        self.payload = payload
        self.head_only = record.method == "HEAD"
        self.decision = decision
        self.record = record
        self.started = started
        self.keep = keep  # the client's connection, if the response ends cleanly
        self.backend: _BackendSide | None = None
        self.reused = False
        self.head_sent = False
        self.chunked = False
        self.delimited = True
        self.done = False
        self.record.attempts = 0
        self.key = (decision.address[0], decision.address[1], client.ctx.namespace)
        self.timer = (
            asyncio.get_running_loop().call_later(decision.timeout, self._timed_out) if decision.timeout else None
        )

    @property
    def last(self) -> bool:
        return self.record.attempts > self.decision.retries

    def attempt(self) -> None:
        self.record.attempts += 1
        backend = self.client.proxy._idle_backend(self.key)
        if backend is not None:
            self._send(backend, True)
        else:
            self.client.proxy.spawn(self._connect())

    async def _connect(self) -> None:
        ctx = self.client.ctx
        try:
            opened = self.client.proxy.upstream.open(ctx, self.decision.address, lambda: _BackendSide(self.key))
            _, backend = await opened
        except (OSError, TimeoutError) as e:
            if self.done:
                return
            if self.last:
                self._answer(503, f"{RESET}connection failure, {e}", "UF")
            else:
                self.attempt()
            return
        if self.done:  # timed out, or the client left, meanwhile
            backend.close()
            return
        self._send(backend, False)

    def _send(self, backend: _BackendSide, reused: bool) -> None:
        self.backend, self.reused = backend, reused
        backend.begin(self)
        backend.transport.write(self.payload)
        backend.pause(self.client.writing_paused)

    # -- what the backend's protocol reports -------------------------------------------------------
    def received(self, backend: _BackendSide) -> None:
        """After a feed of the backend's data: the head (once), body pieces, the end."""
        out = []
        if not self.head_sent:
            if not backend.head_done:
                return
            if backend.status in self.decision.retry_codes and not self.last:
                self._drop_backend()
                self.attempt()
                return
            out.append(self._response_head(backend))
        chunks = backend.chunks
        if chunks:
            for chunk in chunks:
                self.record.response_bytes += len(chunk)
                out.append(b"%x\r\n%s\r\n" % (len(chunk), chunk) if self.chunked else chunk)
            chunks.clear()
        if backend.complete:
            if self.chunked:
                out.append(b"0\r\n\r\n")
            self.client.transport.write(b"".join(out))
            if self.delimited and backend.keep_alive:
                backend.exchange = None
                backend.pause(False)
                self.client.proxy._keep_idle(backend)
            else:
                self._drop_backend()
            self._end(self.delimited)
        elif out:
            self.client.transport.write(b"".join(out))

    def _response_head(self, backend: _BackendSide) -> bytes:
        record = self.record
        record.status = status = backend.status
        transfer = _header(backend.headers, b"transfer-encoding")
        self.chunked = chunked = transfer is not None and transfer.lower().endswith(b"chunked")
        self.delimited = (
            chunked or _header(backend.headers, b"content-length") is not None or self.head_only or status in (204, 304)
        )
        drop = _connection_tokens(backend.headers)
        kept = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in backend.headers
            if (low := n.lower()) not in HOP_BY_HOP and low not in drop
        ]
        kept = self.decision.response_headers(kept)
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in kept)
        if chunked:
            head += "transfer-encoding: chunked\r\n"
        if not self.delimited:
            head += "connection: close\r\n"
        self.head_sent = True
        return (head + "\r\n").encode("latin-1")

    def failed(self, backend: _BackendSide, error: BaseException | None) -> None:
        """The backend's connection ended or spoke garbage before its response was whole."""
        if self.done or backend is not self.backend:
            return
        self._drop_backend()
        if self.head_sent:
            # read-until-close ends so; a delimited one broke off mid-body: the client cannot go on
            self._end(False)
            return
        if not self.last:
            self.attempt()  # a kept-alive connection the backend had closed, or another try
            return
        status = error.status if isinstance(error, ProxyError) else 503
        self._answer(status, f"{RESET}connection termination", "UC")

    # -- endings ---------------------------------------------------------------------------------
    def _timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        self._drop_backend()
        if self.head_sent:  # the response had begun: the client connection cannot be reused
            self._end(False)
        else:
            self._answer(504, "upstream request timeout", "UT")

    def _answer(self, status: int, body: str, flags: str) -> None:
        record = self.record
        record.status, record.flags, record.response_bytes = status, flags, len(body)
        self.client.transport.write(_answer(status, body, close=not self.keep))
        self._end(True)

    def _end(self, clean: bool) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        record = self.record
        record.duration_ms = (time.monotonic() - self.started) * 1000
        if record.status:
            self.client.proxy.on_request(record)
        self.client.finished(self.keep and clean)

    def _drop_backend(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.exchange = None
            backend.close()

    def abandon(self) -> None:
        """The client is gone: the backend connection goes too (its response would have nowhere to go)."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self._drop_backend()
        if self.record.status:
            self.record.duration_ms = (time.monotonic() - self.started) * 1000
            self.client.proxy.on_request(self.record)


class _BackendSide(_ResponseParsing, asyncio.Protocol):
    """One backend connection: an exchange's response parsed (a new parser per response), kept alive in the
    proxy's pool between exchanges."""

    def __init__(self, key: tuple[str, int, str]) -> None:
        super().__init__()
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.reading_paused = False
        self.since = 0.0

    def begin(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.head_only = exchange.head_only
        self.reset()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause(self, paused: bool) -> None:
        """Reading held while the client's connection takes no more (and given back before reuse)."""
        if paused != self.reading_paused and not self.closed:
            self.reading_paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.failed(self, exc)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # an idle connection talking: not reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, ProxyError) as e:
            self.exchange = None  # garbage, or a 101 nobody asked for: this connection is done
            exchange.failed(self, e)
            return
        exchange.received(self)


def _request_head(record: RequestRecord, headers: list[tuple[str, str]]) -> str:
    """A request's line and headers as they go to the backend (the blank line not yet)."""
    return f"{record.method} {record.path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)


def _expects_continue(message: _Message) -> bool:
    value = _header(message.headers, b"expect")
    if value is None or value.lower() != b"100-continue" or message.body:
        return False
    message.headers = [(n, v) for n, v in message.headers if n.lower() != b"expect"]
    return True


LINGER = 2.0  # seconds, and LINGER_BYTES, of what a refused client still sends, read and dropped
LINGER_BYTES = 4 << 20


DRAIN_ABOVE = 64 * 1024  # what a writer may hold before the proxy waits for it to drain


async def _drain(writer: asyncio.StreamWriter) -> None:
    """Wait for the writer to take what it holds, when it holds much (waiting costs a round of the loop)."""
    if writer.transport.get_write_buffer_size() <= DRAIN_ABOVE and not writer.transport.is_closing():
        return
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def parse_query(text: str) -> dict[str, str]:
    """The first value of each query parameter (HTTPRoute queryParams matches)."""
    if not text:
        return {}
    return {k: v[0] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(READ):
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()

    await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
    up_writer.close()
