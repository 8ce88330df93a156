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


@dataclass
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

    async def connect(
        self, ctx: Context, address: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise NotImplementedError


@dataclass
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
    """httptools callbacks for one backend response, handed on as it arrives."""

    def __init__(self) -> None:
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
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            self.headers = []  # an interim answer (100 Continue): the client had ours already
            return
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(bytes(body))

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the feed returns


_random = random.SystemRandom().getrandbits(64)  # a per-process seed for the request IDs' generator
_ids = random.Random(_random)


def new_request_id() -> str:
    """A new x-request-id: a version 4 UUID (random bits, version and variant set), as Envoy makes them;
    from a seeded PRNG (an ID must be unique, not secret): a quarter of uuid.uuid4()'s cost here."""
    n = _ids.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48) | (0x4000 << 64) | (0x8000 << 48)
    h = f"{n:032x}"
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
    """The HTTP/1.1 side of the waypoint: `serve(reader, writer, ctx)` for each client connection."""

    def __init__(self, upstream: Upstream, on_request: Callable[[RequestRecord], None] = lambda r: None) -> None:
        from noded.waypoint.http2 import Http2Proxy

        self.upstream = upstream
        self.on_request = on_request
        self.http2 = Http2Proxy(self)
        self.idle: dict[tuple[str, int, str], list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = {}
        self.deadlines: dict[asyncio.StreamWriter, float] = {}  # clients awaited, and until when
        self.sweeper: asyncio.TimerHandle | None = None
        self.active = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: Context) -> None:
        """One client connection: HTTP/2 with prior knowledge (its preface first) goes to http2.py, anything
        else is HTTP/1.1."""
        parsing = _RequestParsing()
        self.active += 1
        try:
            self.expect(writer, HEAD_TIMEOUT)
            first = await reader.read(READ)
            self.expected(writer)
            while first and len(first) < len(PREFACE) and PREFACE.startswith(first):
                more = await reader.read(READ)
                if not more:
                    break
                first += more
            if first.startswith(PREFACE):
                await self.http2.serve(reader, writer, ctx, first)
                return
            while True:
                if not parsing.done:
                    if first:
                        data, first = first, b""
                    else:  # a client is given so long between requests, and to finish a head it began
                        self.expect(writer, IDLE_CLIENT if parsing.current is None else HEAD_TIMEOUT)
                        data = await reader.read(READ)
                        self.expected(writer)
                    if not data:
                        return
                    upgrade_rest = None
                    try:
                        parsing.parser.feed_data(data)
                    except httptools.HttpParserUpgrade as e:
                        upgrade_rest = data[e.args[0] :] if e.args else b""
                    except (httptools.HttpParserError, ProxyError, ValueError):
                        await _refuse(reader, writer, 400, "Bad Request")
                        return
                    if upgrade_rest is not None:
                        if parsing.current is not None and not parsing.current.complete:
                            parsing.on_message_complete()  # an upgrade request ends at its head
                        message = parsing.done.pop()
                        if parsing.done:  # pipelined before an upgrade: not served
                            await _refuse(reader, writer, 400, "Bad Request")
                            return
                        await self._upgrade(message, upgrade_rest, reader, writer, ctx)
                        return
                    if parsing.current is not None and parsing.current.too_big and not parsing.done:
                        await _refuse(reader, writer, 413, "Payload Too Large")
                        return
                    if parsing.current is not None and _expects_continue(parsing.current):
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    continue
                message = parsing.done.popleft()
                if message.too_big:
                    await _refuse(reader, writer, 413, "Payload Too Large")
                    return
                keep = await self._request(message, writer, ctx)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.active -= 1
            self.expected(writer)
            writer.close()

    # -- client deadlines: one sweep a SWEEP seconds for every connection, not a timer per read ---------
    def expect(self, writer: asyncio.StreamWriter, seconds: float) -> None:
        """The client must send something within `seconds`, or its connection is closed."""
        self.deadlines[writer] = time.monotonic() + seconds
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def expected(self, writer: asyncio.StreamWriter) -> None:
        self.deadlines.pop(writer, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for writer, deadline in list(self.deadlines.items()):
            if deadline <= now:
                del self.deadlines[writer]
                writer.close()
        self.sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep) if self.deadlines else None

    # -- one request -----------------------------------------------------------------------------
    def _prepare(self, message: _Message, ctx: Context) -> tuple[Request, dict[str, str], str, list[tuple[str, str]]]:
        url = message.url.decode("latin-1")
        parsed = httptools.parse_url(bytes(message.url)) if url.startswith(("http://", "https://")) else None
        raw_path = (
            url
            if parsed is None
            else (parsed.path or b"/").decode("latin-1")
            + ("?" + parsed.query.decode("latin-1") if parsed.query else "")
        )
        path, _, query_text = raw_path.partition("?")
        query = parse_query(query_text)
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in message.headers]
        lowered = {}
        for n, v in headers:
            lowered.setdefault(n.lower(), v)
        host = lowered.get("host", "")
        request = Request(message.method.decode("latin-1"), host, path, lowered)
        return request, query, raw_path, headers

    async def _request(self, message: _Message, writer: asyncio.StreamWriter, ctx: Context) -> bool:
        """Serve one request; whether the client connection stays open."""
        started = time.monotonic()
        request, query, raw_path, headers = self._prepare(message, ctx)
        request_id = request.headers.get("x-request-id") or new_request_id()
        record = RequestRecord(request.method, request.host, raw_path, 0, 0.0, request_id, ctx)
        record.request_bytes = len(message.body)
        keep = message.keep_alive
        try:
            decision = self.decide(ctx, request, query, record)
            forwarded = self._forward_headers(headers, request, request_id, ctx, decision)
            head = f"{request.method} {raw_path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in forwarded)
            head += (
                f"content-length: {len(message.body)}\r\n\r\n"
                if message.body or request.method in ("POST", "PUT", "PATCH")
                else "\r\n"
            )
            payload = head.encode("latin-1") + bytes(message.body)
            coro = self._exchange(payload, request.method == "HEAD", writer, ctx, decision, record)
            if decision.timeout:
                try:
                    keep_upstream_ok = await asyncio.wait_for(coro, decision.timeout)
                except TimeoutError:
                    if record.status:  # the response had begun: the client connection cannot be reused
                        return False
                    raise ProxyError(504, "upstream request timeout", "UT") from None
            else:
                keep_upstream_ok = await coro
            keep = keep and keep_upstream_ok
        except ProxyError as e:
            record.status, record.flags = e.status, e.flags
            writer.write(_answer(e.status, e.body, close=not keep))
            record.response_bytes = len(e.body)
        finally:
            record.duration_ms = (time.monotonic() - started) * 1000
            if record.status:
                self.on_request(record)
        await _drain(writer)
        return keep

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
        drop = {
            t.decode("latin-1")
            for t in _connection_tokens([(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers])
        }
        out, xff = [], None
        for n, v in headers:
            low = n.lower()
            if low.encode() in HOP_BY_HOP or low in drop or low in ("content-length", "expect"):
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

    async def _exchange(
        self,
        payload: bytes,
        head_only: bool,
        writer: asyncio.StreamWriter,
        ctx: Context,
        decision: Decision,
        record: RequestRecord,
    ) -> bool:
        """Send the request, stream the response back; retried as the rule says. Whether the backend
        connection ended cleanly (the client's may stay open)."""
        attempts = decision.retries + 1
        for attempt in range(1, attempts + 1):
            record.attempts = attempt
            last = attempt == attempts
            try:
                up_reader, up_writer, reused = await self._backend(ctx, decision.address)
            except (OSError, TimeoutError) as e:
                if last:
                    raise ProxyError(
                        503,
                        f"{RESET}connection failure, {e}",
                        "UF",
                    ) from None
                continue
            try:
                up_writer.write(payload)
                response = _ResponseParsing()
                while not response.head_done:
                    data = await up_reader.read(READ)
                    if not data:
                        raise ConnectionResetError("backend closed before answering")
                    _feed(response, data)
                    if response.head_done and head_only:
                        response.complete = True
                        response.keep_alive = _header(response.headers, b"connection") != b"close"
            except (OSError, ProxyError, httptools.HttpParserError) as e:
                up_writer.close()
                if reused and not last:
                    continue  # a kept-alive connection the backend had closed: try afresh
                if last:
                    status = e.status if isinstance(e, ProxyError) else 503
                    raise ProxyError(
                        status,
                        f"{RESET}connection termination",
                        "UC",
                    ) from None
                continue
            if response.status in decision.retry_codes and not last:
                up_writer.close()
                continue
            return await self._respond(response, up_reader, up_writer, writer, decision, record, ctx)
        raise ProxyError(503, "no healthy upstream", "UH")

    async def _respond(
        self,
        response: _ResponseParsing,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        writer: asyncio.StreamWriter,
        decision: Decision,
        record: RequestRecord,
        ctx: Context,
    ) -> bool:
        record.status = response.status
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers]
        chunked = (_header(response.headers, b"transfer-encoding") or b"").lower().endswith(b"chunked")
        length = _header(response.headers, b"content-length")
        delimited = chunked or length is not None or record.method == "HEAD" or response.status in (204, 304)
        drop = {t.decode("latin-1") for t in _connection_tokens(response.headers)}
        kept = [(n, v) for n, v in headers if n.lower().encode() not in HOP_BY_HOP and n.lower() not in drop]
        kept = decision.response_headers(kept)
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}"] + [f"{n}: {v}" for n, v in kept]
        if chunked:
            head.append("transfer-encoding: chunked")
        if not delimited:
            head.append("connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        sent = 0
        while True:
            for chunk in response.chunks:
                sent += len(chunk)
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            response.chunks.clear()
            if response.complete:
                break
            await _drain(writer)
            data = await up_reader.read(READ)
            if not data:
                if not delimited:
                    break
                up_writer.close()
                record.response_bytes = sent
                return False  # the backend broke off mid-body: the client's connection cannot go on
            _feed(response, data)
        if chunked:
            writer.write(b"0\r\n\r\n")
        record.response_bytes = sent
        if delimited and response.keep_alive:
            self._keep_idle(ctx, decision.address, up_reader, up_writer)
        else:
            up_writer.close()
        return delimited

    async def _upgrade(
        self, message: _Message, rest: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: Context
    ) -> None:
        """An Upgrade request (WebSocket): forwarded; a 101 turns both connections into a splice."""
        started = time.monotonic()
        request, query, raw_path, headers = self._prepare(message, ctx)
        request_id = request.headers.get("x-request-id") or new_request_id()
        record = RequestRecord(request.method, request.host, raw_path, 0, 0.0, request_id, ctx)
        try:
            decision = self.decide(ctx, request, query, record)
            forwarded = self._forward_headers(headers, request, request_id, ctx, decision)
            upgrade = request.headers.get("upgrade", "")
            head = f"{request.method} {raw_path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in forwarded)
            head += f"connection: upgrade\r\nupgrade: {upgrade}\r\n\r\n"
            try:
                up_reader, up_writer = await self.upstream.connect(ctx, decision.address)
            except (OSError, TimeoutError):
                raise ProxyError(
                    503,
                    f"{RESET}connection failure",
                    "UF",
                ) from None
            up_writer.write(head.encode("latin-1") + rest)
            response = _ResponseParsing()
            data = b""
            while not response.head_done:
                data = await up_reader.read(READ)
                if not data:
                    raise ProxyError(
                        503,
                        f"{RESET}connection termination",
                        "UC",
                    )
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
    async def _backend(
        self, ctx: Context, address: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        key = (address[0], address[1], ctx.namespace)
        idle = self.idle.get(key) or []
        now = time.monotonic()
        while idle:
            r, w, since = idle.pop()
            if now - since < IDLE_TIMEOUT and not w.is_closing() and not r.at_eof():
                return r, w, True
            w.close()
        reader, writer = await self.upstream.connect(ctx, address)
        return reader, writer, False

    def _keep_idle(
        self, ctx: Context, address: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        idle = self.idle.setdefault((address[0], address[1], ctx.namespace), [])
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            writer.close()
            return
        idle.append((reader, writer, time.monotonic()))

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.http2.close()
        for idle in self.idle.values():
            for _r, w, _t in idle:
                w.close()
        self.idle.clear()


def _feed(response: _ResponseParsing, data: bytes) -> None:
    try:
        response.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        response.head_done = True  # a 101 to a request that did not ask for it: the head is what counts


def _expects_continue(message: _Message) -> bool:
    value = _header(message.headers, b"expect")
    if value is None or value.lower() != b"100-continue" or message.body:
        return False
    message.headers = [(n, v) for n, v in message.headers if n.lower() != b"expect"]
    return True


LINGER = 2.0  # seconds, and LINGER_BYTES, of what a refused client still sends, read and dropped
LINGER_BYTES = 4 << 20


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, body: str) -> None:
    """Answer and close the connection as a lingering close does: our side shut, what the client is still
    sending read and dropped for a while, so its kernel does not reset the answer away."""
    writer.write(_answer(status, body, close=True))
    await _drain(writer)
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
    dropped, deadline = 0, asyncio.get_running_loop().time() + LINGER
    with contextlib.suppress(OSError, TimeoutError):
        while dropped < LINGER_BYTES:
            left = deadline - asyncio.get_running_loop().time()
            data = await asyncio.wait_for(reader.read(READ), max(left, 0))
            if not data:
                break
            dropped += len(data)


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


Connector = Callable[[Context, tuple[str, int]], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
