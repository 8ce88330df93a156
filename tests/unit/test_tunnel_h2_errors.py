"""Bad HTTP/2 on an HBONE connection, sent frame by frame over real mutual TLS: each mistake ends that
connection with the GOAWAY code RFC 9113 names, PING is answered, a stream the client resets goes alone,
and the listener goes on serving the next connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import hpack
import pytest

from noded.tunnel import ca as ca_mod
from noded.tunnel import frames as f
from noded.tunnel.ca import CertificateAuthority, create_root
from noded.tunnel.frames import ErrorCode
from noded.tunnel.tls import context
from tests.unit.test_tunnel_hbone import echo_app, hbone_server
from tests.unit.test_tunnel_identity import SHELL, TD, workload


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority(*create_root(TD))


def read_frames(sock, until: int | None = None) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of what the server sends until it closes (or sends `until`)."""
    got, buf = [], b""
    sock.settimeout(5)
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionError, OSError):
            data = b""
        buf += data
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            length = int.from_bytes(buf[:3], "big")
            got.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big"), buf[9 : 9 + length]))
            buf = buf[9 + length :]
            if until is not None and got[-1][0] == until:
                return got
        if not data:
            return got


def goaway_code(got) -> int | None:
    codes = [int.from_bytes(p[4:8], "big") for t, _fl, _s, p in got if t == f.GOAWAY]
    return codes[-1] if codes else None


def test_protocol_mistakes_end_only_their_connection(ca, tmp_path):
    root = ca_mod.cert_pem(ca.root)
    client_ctx = context(False, workload(ca, SHELL), root, str(tmp_path))

    def connect_tls(port):
        return client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="x")

    def connect_request(authority: str) -> bytes:
        block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
        return f.frame(f.HEADERS, f.END_HEADERS, 1, block)

    def session(port: int, *sent: bytes, until: int | None = None, preface: bytes = f.PREFACE) -> list:
        with connect_tls(port) as sock:
            sock.sendall(preface + f.settings({}) + b"".join(sent))
            return read_frames(sock, until)

    async def main():
        app, app_port = await echo_app()
        server, port, _seen = await hbone_server(ca, tmp_path, lambda *_: True)

        def cases() -> None:
            # PING is answered with its payload
            got = session(port, f.frame(f.PING, 0, 0, b"12345678"), until=f.PING)
            assert (f.PING, f.ACK, 0, b"12345678") in got
            # a frame larger than the MAX_FRAME_SIZE we announced
            oversized = bytearray(9)
            f.header(oversized, 2 * 1024 * 1024, 0xFF, 0, 0)  # the header alone tells
            assert goaway_code(session(port, bytes(oversized))) == ErrorCode.FRAME_SIZE_ERROR
            # not the HTTP/2 preface
            assert goaway_code(session(port, preface=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(8))) == 1
            # a client may not open even-numbered streams
            block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", f"127.0.0.1:{app_port}")])
            even = f.frame(f.HEADERS, f.END_HEADERS, 2, block)
            assert goaway_code(session(port, even)) == ErrorCode.PROTOCOL_ERROR
            # garbage where a header block should be
            junk = f.frame(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff\xff")
            assert goaway_code(session(port, junk)) == ErrorCode.COMPRESSION_ERROR
            # a header block interrupted by another frame
            cut = f.frame(f.HEADERS, 0, 1, block) + f.frame(f.PING, 0, 0, bytes(8))
            assert goaway_code(session(port, cut)) == ErrorCode.PROTOCOL_ERROR
            # SETTINGS with a MAX_FRAME_SIZE below HTTP/2's minimum
            bad = f.frame(f.SETTINGS, 0, 0, f.MAX_FRAME_SIZE.to_bytes(2, "big") + (100).to_bytes(4, "big"))
            assert goaway_code(session(port, bad)) == ErrorCode.PROTOCOL_ERROR
            # a CONNECT the client resets: the stream goes, the connection stays (PING still answered)
            reset = connect_request(f"127.0.0.1:{app_port}") + f.rst_stream(1, ErrorCode.CANCEL)
            got = session(port, reset, f.frame(f.PING, 0, 0, b"abcdefgh"), until=f.PING)
            assert (f.PING, f.ACK, 0, b"abcdefgh") in got and goaway_code(got) is None
            # and after all that, a well-formed CONNECT is served
            with connect_tls(port) as sock:
                sock.sendall(f.PREFACE + f.settings({}) + connect_request(f"127.0.0.1:{app_port}"))
                sock.sendall(f.frame(f.DATA, 0, 1, b"still serving"))
                got = read_frames(sock, until=f.DATA)
            assert (f.DATA, 0, 1, b"still serving") in got

        await asyncio.to_thread(cases)
        server.close()
        app.close()

    asyncio.run(main())


def test_an_hbone_receiver_bounds_what_one_peer_can_make_it_hold(ca, tmp_path, monkeypatch):
    """Issue 17, item 5: CONTINUATION frames piled up without limit, data for streams whose dial was pending
    was held after the connection window was given back, open-and-reset streams cost a dial each, and a
    server connection without streams stayed forever. Each is bounded now, with ENHANCE_YOUR_CALM."""
    from noded.tunnel import h2conn

    monkeypatch.setattr(h2conn, "SERVER_IDLE", 0.5)
    root = ca_mod.cert_pem(ca.root)
    client_ctx = context(False, workload(ca, SHELL), root, str(tmp_path))

    def connect_tls(port):
        return client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="x")

    def headers(stream_id: int, authority: str, end_headers: bool = True) -> bytes:
        block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
        return f.frame(f.HEADERS, f.END_HEADERS if end_headers else 0, stream_id, block)

    async def main():
        app, app_port = await echo_app()
        server, port, seen = await hbone_server(ca, tmp_path, lambda *_: True)

        def cases() -> None:
            # 1. a header block that never ends: CONTINUATION after CONTINUATION
            with connect_tls(port) as sock:
                sock.sendall(f.PREFACE + f.settings({}) + headers(1, f"127.0.0.1:{app_port}", end_headers=False))
                chunk = f.frame(f.CONTINUATION, 0, 1, b"\x00" * 16000)
                try:
                    for _ in range(100):  # 1.6 MB of header block
                        sock.sendall(chunk)
                except OSError:
                    pass  # the server hung up on us: what we want
                assert goaway_code(read_frames(sock)) == ErrorCode.ENHANCE_YOUR_CALM
            # 2. open-and-reset, 20,000 times: the connection goes long before 20,000 dials
            before = len(seen)
            with connect_tls(port) as sock:
                burst = b"".join(
                    headers(i, f"127.0.0.1:{app_port}") + f.rst_stream(i, ErrorCode.CANCEL) for i in range(1, 40001, 2)
                )
                with contextlib.suppress(OSError):
                    sock.sendall(f.PREFACE + f.settings({}) + burst)
                assert goaway_code(read_frames(sock)) == ErrorCode.ENHANCE_YOUR_CALM
            assert len(seen) - before <= h2conn.MAX_RESETS + h2conn.MAX_STREAMS
            # 3. a connection that opens no stream is closed after SERVER_IDLE
            with connect_tls(port) as sock:
                sock.sendall(f.PREFACE + f.settings({}))
                got = read_frames(sock)  # returns once the server closes
                assert goaway_code(got) == ErrorCode.NO_ERROR
            # and the listener serves the next connection
            with connect_tls(port) as sock:
                sock.sendall(f.PREFACE + f.settings({}) + f.frame(f.PING, 0, 0, b"abcdefgh"))
                assert (f.PING, f.ACK, 0, b"abcdefgh") in read_frames(sock, until=f.PING)

        await asyncio.get_running_loop().run_in_executor(None, cases)
        server.close()
        app.close()

    asyncio.run(main())


def test_data_held_for_streams_still_dialing_is_bounded(ca, tmp_path, monkeypatch):
    """Issue 17, item 5: while the dial to the application is pending, what a stream receives is held; over
    1 MiB a stream is reset, over 8 MiB for the connection it ends (was: up to 4 GiB per connection)."""
    from noded.tunnel import h2conn

    monkeypatch.setattr(h2conn, "MAX_EARLY", 2 * 1024 * 1024)
    root = ca_mod.cert_pem(ca.root)
    client_ctx = context(False, workload(ca, SHELL), root, str(tmp_path))
    blackhole = socket.socket()  # a listener that never accepts: the dials stay in progress
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    # fill its backlog so further connects hang in SYN_SENT
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", blackhole.getsockname()[1]))
        fillers.append(s)
    target = f"127.0.0.1:{blackhole.getsockname()[1]}"

    async def main():
        server, port, _seen = await hbone_server(ca, tmp_path, lambda *_: True)

        def case(per_stream: int, streams: tuple[int, ...]) -> list:
            with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="x") as sock:
                out = f.PREFACE + f.settings({})
                for sid in streams:
                    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", target)])
                    out += f.frame(f.HEADERS, f.END_HEADERS, sid, block)
                sock.sendall(out)
                try:
                    for sid in streams:
                        for _ in range(per_stream):
                            sock.sendall(f.frame(f.DATA, 0, sid, b"x" * 400_000))
                except OSError:
                    pass
                return read_frames(sock, until=f.RST_STREAM if len(streams) == 1 else None)

        run = asyncio.get_running_loop().run_in_executor
        one = await run(None, case, 3, (1,))  # 1.2 MB for one stream: over its own bound
        assert (f.RST_STREAM, 0, 1, int(ErrorCode.ENHANCE_YOUR_CALM).to_bytes(4, "big")) in one
        many = await run(None, case, 2, (1, 3, 5, 7))  # 800 KB each, 3.2 MB together: over the connection's
        assert goaway_code(many) == ErrorCode.ENHANCE_YOUR_CALM
        server.close()

    try:
        asyncio.run(main())
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


def test_fuzz_findings_in_the_frame_reader_end_the_connection_with_goaway():
    """Found by bench/fuzz.py: a GOAWAY with an error code RFC 9113 does not define raised TypeError
    (`int in ErrorCode` on Python 3.11); a GOAWAY shorter than 8 bytes was read as one."""
    from noded.tunnel import h2conn
    from noded.tunnel.frames import H2Error

    class Transport:
        closed = False

        def writelines(self, _chunks):
            pass

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

    async def main():
        for payload, raises in ((b"\x00\x00\x00\x00\x00\x00\xf5\x00", False), (b"\x00\x00", True)):
            conn = h2conn.Connection(client=False, on_request=lambda stream, headers: None)
            conn.transport = Transport()
            data = f.PREFACE + f.settings({}) + f.frame(f.GOAWAY, 0, 0, payload)
            view = h2conn.scratch(len(data))
            view[: len(data)] = data
            if raises:
                with pytest.raises(H2Error):
                    conn.input.feed(view, len(data))
            else:
                conn.input.feed(view, len(data))
                assert conn.transport.closed

    asyncio.run(main())
