"""The waypoint's HTTP/1.1 proxy against real HTTP servers on loopback (no root): request IDs, forwarding
headers, keep-alive and pooling, pipelining, chunked bodies, policy, retries, timeouts, upgrades, garbage."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import uuid

import pytest

from noded.waypoint.http1 import Context, Decision, Proxy, RequestRecord, Upstream


class Backend:
    """An HTTP/1.1 server answering each request with what it received, as JSON (keep-alive)."""

    def __init__(self, fail_first: int = 0, delay: float = 0.0, chunked: bool = False) -> None:
        self.fail_first, self.delay, self.chunked = fail_first, delay, chunked
        self.connections = 0
        self.requests = 0

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    if line:
                        n, _, v = line.partition(": ")
                        headers.setdefault(n.lower(), v)
                if headers.get("upgrade"):
                    writer.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
                    )
                    while data := await reader.read(1024):
                        writer.write(data.upper())
                    writer.close()
                    return
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests += 1
                if path.startswith("/big/"):  # a large body, written as fast as the connection takes it
                    size = int(path[5:])
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                    for i in range(0, size, 1 << 16):
                        writer.write(bytes([i >> 16 & 0xFF]) * min(1 << 16, size - i))
                        await writer.drain()
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.requests <= self.fail_first:
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
                    continue
                out = json.dumps({"method": method, "path": path, "headers": headers, "body": body.decode()}).encode()
                if method == "HEAD":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(out))
                elif self.chunked:
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    for piece in (out[:10], out[10:]):
                        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nx-backend: yes\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


class FakeUpstream(Upstream):
    def __init__(self, address: tuple[str, int], **decision) -> None:
        self.address, self.decision = address, decision
        self.allow = lambda request: True
        self.connects = 0

    def authorize(self, ctx, request):
        return self.allow(request), None

    def route(self, ctx, request, query):
        return Decision(address=self.address, backend="default/echo:80", **self.decision)

    async def open(self, ctx, address, factory):
        self.connects += 1
        return await asyncio.get_running_loop().create_connection(factory, *address)


async def _proxy(upstream: Upstream) -> tuple[Proxy, tuple[str, int], list[RequestRecord]]:
    records: list[RequestRecord] = []
    proxy = Proxy(upstream, records.append)
    ctx = Context("10.0.0.9", "cluster.local/ns/default/sa/shell", "default", "echo", 80, "waypoint")
    server = await asyncio.get_running_loop().create_server(lambda: proxy.protocol(ctx), "127.0.0.1", 0)
    return proxy, server.sockets[0].getsockname()[:2], records


async def _exchange(address: tuple[str, int], data: bytes, responses: int = 1) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    out = b""
    while out.count(b"HTTP/1.1 ") < responses or not _complete(out, responses):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        out += chunk
    writer.close()
    return out


def _complete(data: bytes, responses: int) -> bool:
    """Whether `responses` whole responses (content-length or chunked framed) are in data."""
    rest = data
    for _ in range(responses):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            end = rest.find(b"0\r\n\r\n")
            if end < 0:
                return False
            rest = rest[end + 5 :]
        else:
            length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length: " in lower else 0
            if len(rest) < length:
                return False
            rest = rest[length:]
    return True


def _bodies(data: bytes) -> list[dict]:
    out = []
    for part in data.split(b"HTTP/1.1 ")[1:]:
        body = part.partition(b"\r\n\r\n")[2]
        if b"transfer-encoding: chunked" in part.partition(b"\r\n\r\n")[0].lower():
            pieces, rest = b"", body
            while True:
                size, _, rest = rest.partition(b"\r\n")
                if int(size, 16) == 0:
                    break
                pieces, rest = pieces + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
            body = pieces
        out.append(json.loads(body) if body.startswith(b"{") else {"raw": body.decode()})
    return out


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_request_id_is_added_when_absent_and_kept_when_present_with_forwarding_headers():
    async def main():
        backend = Backend()
        _, address, records = await _proxy(FakeUpstream(await backend.start()))
        got = _bodies(await _exchange(address, b"GET /a?x=1 HTTP/1.1\r\nHost: echo\r\n\r\n"))[0]
        rid = got["headers"]["x-request-id"]
        assert uuid.UUID(rid).version == 4
        assert got["path"] == "/a?x=1"
        assert got["headers"]["x-forwarded-for"] == "10.0.0.9"
        assert got["headers"]["x-forwarded-proto"] == "http"
        kept = _bodies(
            await _exchange(
                address, b"GET / HTTP/1.1\r\nHost: echo\r\nX-Request-Id: mine\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
            )
        )[0]
        assert kept["headers"]["x-request-id"] == "mine"
        assert kept["headers"]["x-forwarded-for"] == "1.2.3.4, 10.0.0.9"
        assert [r.status for r in records] == [200, 200]
        assert records[0].request_id == rid and records[1].request_id == "mine"

    run(main())


def test_kept_alive_clients_reuse_one_backend_connection_and_pipelined_requests_answer_in_order():
    async def main():
        backend = Backend()
        upstream = FakeUpstream(await backend.start())
        _, address, _ = await _proxy(upstream)
        pipelined = b"".join(b"GET /%d HTTP/1.1\r\nHost: echo\r\n\r\n" % i for i in range(5))
        answers = _bodies(await _exchange(address, pipelined, responses=5))
        assert [a["path"] for a in answers] == ["/0", "/1", "/2", "/3", "/4"]
        assert upstream.connects == 1 and backend.connections == 1

    run(main())


def test_chunked_bodies_both_ways_and_head_answers_without_a_body():
    async def main():
        backend = Backend(chunked=True)
        _, address, _ = await _proxy(FakeUpstream(await backend.start()))
        request = b"POST /up HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n"
        request += b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        raw = await _exchange(address, request)
        assert b"transfer-encoding: chunked" in raw.lower()
        assert _bodies(raw)[0]["body"] == "hello world"
        plain = Backend()
        _, address2, _ = await _proxy(FakeUpstream(await plain.start()))
        reader, writer = await asyncio.open_connection(*address2)
        writer.write(b"HEAD / HTTP/1.1\r\nHost: echo\r\n\r\nGET /after HTTP/1.1\r\nHost: echo\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            data += await asyncio.wait_for(reader.read(65536), 5)
        _head, _, second = data.partition(b"\r\n\r\n")
        assert second.startswith(b"HTTP/1.1 200")  # HEAD's answer had no body: the next response follows
        assert b'"/after"' in second
        writer.close()

    run(main())


def test_policy_denial_is_403_with_envoys_body_and_the_connection_goes_on():
    async def main():
        backend = Backend()
        upstream = FakeUpstream(await backend.start())
        upstream.allow = lambda request: request.method == "GET"
        _, address, records = await _proxy(upstream)
        raw = await _exchange(
            address,
            b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\nHost: echo\r\n\r\n",
            2,
        )
        assert raw.startswith(b"HTTP/1.1 403 Forbidden")
        assert b"\r\n\r\nRBAC: access denied" in raw
        assert raw.count(b"HTTP/1.1 200 OK") == 1
        assert [r.status for r in records] == [403, 200] and records[0].flags == "UAEX"
        assert backend.requests == 1

    run(main())


def test_a_503_is_retried_and_a_dead_backend_is_503_after_the_retries():
    async def main():
        backend = Backend(fail_first=2)
        _, address, records = await _proxy(FakeUpstream(await backend.start(), retries=2, retry_codes=(503,)))
        raw = await _exchange(address, b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and records[-1].attempts == 3
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()  # nothing listens there
        upstream = FakeUpstream(("127.0.0.1", port), retries=2)
        _, address2, records2 = await _proxy(upstream)
        raw = await _exchange(address2, b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 503") and b"connection failure" in raw
        assert upstream.connects == 3 and records2[-1].flags == "UF"
        no_retry = Backend(fail_first=1)
        _, address3, _ = await _proxy(FakeUpstream(await no_retry.start(), retries=0, retry_codes=(503,)))
        assert (await _exchange(address3, b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")).startswith(b"HTTP/1.1 503")

    run(main())


def test_the_request_timeout_answers_504():
    async def main():
        backend = Backend(delay=1.0)
        _, address, records = await _proxy(FakeUpstream(await backend.start(), timeout=0.2))
        raw = await _exchange(address, b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 504") and b"upstream request timeout" in raw
        assert records[-1].flags == "UT"

    run(main())


def test_a_websocket_upgrade_becomes_a_splice():
    async def main():
        backend = Backend()
        _, address, records = await _proxy(FakeUpstream(await backend.start()))
        reader, writer = await asyncio.open_connection(*address)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        writer.write(b"frames")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"FRAMES"
        writer.close()
        assert records[-1].status == 101

    run(main())


def test_garbage_is_400_and_closed_while_other_clients_go_on():
    async def main():
        backend = Backend()
        _, address, _ = await _proxy(FakeUpstream(await backend.start()))
        good_reader, good_writer = await asyncio.open_connection(*address)
        good_writer.write(b"GET /1 HTTP/1.1\r\nHost: echo\r\n\r\n")
        await _response(good_reader)
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"\x16\x03\x01 not http at all\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)  # read() to EOF: the proxy closed it
        assert raw.startswith(b"HTTP/1.1 400") and b"connection: close" in raw
        good_writer.write(b"GET /2 HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert b'"/2"' in await _response(good_reader)
        good_writer.close()

    run(main())


def test_a_body_over_the_limit_is_413():
    async def main():
        backend = Backend()
        _, address, _ = await _proxy(FakeUpstream(await backend.start()))
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n" % (3 << 20))
        writer.write(b"x" * (2 << 20))
        raw = await asyncio.wait_for(reader.read(), 5)
        assert raw.startswith(b"HTTP/1.1 413")
        assert backend.requests == 0

    run(main())


@pytest.mark.parametrize("expect", [True, False])
def test_expect_100_continue_is_answered_by_the_waypoint(expect):
    async def main():
        backend = Backend()
        _, address, _ = await _proxy(FakeUpstream(await backend.start()))
        reader, writer = await asyncio.open_connection(*address)
        extra = b"Expect: 100-continue\r\n" if expect else b""
        writer.write(b"PUT / HTTP/1.1\r\nHost: echo\r\nContent-Length: 2\r\n" + extra + b"\r\n")
        if expect:
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()

    run(main())


def test_a_slow_head_and_an_idle_client_are_closed(monkeypatch):
    from noded.waypoint import http1

    monkeypatch.setattr(http1, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(http1, "IDLE_CLIENT", 0.5)
    monkeypatch.setattr(http1, "SWEEP", 0.05)

    async def main():
        backend = Backend()
        proxy, address, _ = await _proxy(FakeUpstream(await backend.start()))
        slow_reader, slow_writer = await asyncio.open_connection(*address)
        slow_writer.write(b"GET / HTTP/1.1\r\nHost: ec")  # and then nothing (slowloris)
        idle_reader, idle_writer = await asyncio.open_connection(*address)
        idle_writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        await _response(idle_reader)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(slow_reader.read(), 3) == b""  # closed
        assert asyncio.get_running_loop().time() - started < 1.0
        assert await asyncio.wait_for(idle_reader.read(), 3) == b""  # closed once idle past the limit
        await asyncio.sleep(0.05)
        assert proxy.active == 0

    run(main())


def test_a_large_response_to_a_slow_client_holds_the_backend_back_and_its_connection_is_reused():
    """The response is streamed at the client's pace: the backend's reading is paused while the client's
    connection is full (the proxy holds little), given back after, and the connection serves the next
    request."""

    async def main():
        backend = Backend()
        upstream = FakeUpstream(await backend.start())
        proxy = Proxy(upstream)
        ctx = Context("10.0.0.9", None, "default", "echo", 80, "waypoint")
        sides = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: sides.append(proxy.protocol(ctx)) or sides[-1], "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2], limit=1 << 16)
        size = 8 << 20
        writer.write(b"GET /big/%d HTTP/1.1\r\nHost: echo\r\n\r\n" % size)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: %d" % size in head
        got, held = 0, 0
        while got < size:
            chunk = await asyncio.wait_for(reader.read(1 << 16), 5)
            assert chunk
            got += len(chunk)
            if got < size // 2:
                await asyncio.sleep(0.001)  # a slow reader for the first half
                held = max(held, sides[0].transport.get_write_buffer_size())
        assert held < 2 << 20  # back-pressure: the proxy never held the body
        writer.write(b"GET /after HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert b'"/after"' in await _response(reader)
        assert upstream.connects == 1
        writer.close()

    run(main())


def test_a_client_leaving_mid_response_takes_the_backend_connection_with_it():
    async def main():
        backend = Backend(delay=0.2)
        upstream = FakeUpstream(await backend.start())
        proxy, address, _ = await _proxy(upstream)
        _, writer = await asyncio.open_connection(*address)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: echo\r\n\r\n")
        await asyncio.sleep(0.05)
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # reset, not a half-close (after which the answer would still go out)
        await asyncio.sleep(0.4)
        assert proxy.active == 0
        assert not any(proxy.idle.values())  # not put back: its answer had nowhere to go
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"GET /next HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert b'"/next"' in await _response(reader)
        assert upstream.connects == 2
        writer.close()

    run(main())


def test_garbage_after_a_pipelined_request_is_answered_400_after_it():
    async def main():
        backend = Backend()
        _, address, _ = await _proxy(FakeUpstream(await backend.start()))
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"GET /first HTTP/1.1\r\nHost: echo\r\n\r\n\x16\x03\x01 garbage\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)  # to EOF
        first, _, rest = raw.partition(b"HTTP/1.1 400")
        assert first.startswith(b"HTTP/1.1 200") and b'"/first"' in first and rest

    run(main())
