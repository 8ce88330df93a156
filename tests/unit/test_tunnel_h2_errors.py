"""Bad HTTP/2 on an HBONE connection, sent frame by frame over real mutual TLS: each mistake ends that
connection with the GOAWAY code RFC 9113 names, PING is answered, a stream the client resets goes alone,
and the listener goes on serving the next connection."""

from __future__ import annotations

import asyncio
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
