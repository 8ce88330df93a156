"""A unary gRPC call over HTTP/2 cleartext on a unix socket, in the standard library only (and noded/h2wire.py,
HTTP/2's wire primitives, which import nothing).

noded-cni runs once per pod setup and must start fast: importing grpcio alone costs ~80 ms, this
costs nothing (it avoids even the `socket` and `struct` modules). It speaks just enough HTTP/2 for one
call: the preface, SETTINGS (and their ACK), one HEADERS frame (HPACK literals, no Huffman, no dynamic
table), one DATA frame, and reads DATA frames until the stream ends, giving each one's bytes back with
WINDOW_UPDATE (a reply past the initial 64 KiB window would stall otherwise), up to MAX_REPLY. The
daemon always answers with a reply message, so the response headers and trailers never need decoding; a
stream that ends without a message is reported as a failure.
"""

from __future__ import annotations

import _socket  # not `socket`: its import (enum, selectors) costs ~3 ms of the plugin's start
import json

from noded.h2wire import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    literal,
)

MAX_REPLY = 64 << 20  # a reply larger than this is refused (the daemon's status at 5,000 services is ~3 MiB)


class CallError(Exception):
    pass


def request_headers(path: str, authority: str = "localhost") -> bytes:
    return (
        b"\x83"  # :method POST (static 3)
        + b"\x86"  # :scheme http (static 6)
        + literal(4, path)  # :path
        + literal(1, authority)  # :authority
        + literal(31, "application/grpc+json")  # content-type
        + literal("te", "trailers")
    )


def call(socket_path: str, method: str, message: dict, timeout: float = 10.0) -> dict:
    """POST one message to /method and return the reply message. Raises OSError when the socket is
    unreachable, CallError when the daemon did not reply with a message."""
    body = json.dumps(message).encode()
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(
            PREFACE
            + frame(SETTINGS, 0, 0)
            + frame(HEADERS, END_HEADERS, 1, request_headers(method))
            + frame(DATA, END_STREAM, 1, b"\x00" + len(body).to_bytes(4, "big") + body)
        )
        chunks: list[bytes] = []
        received = 0
        reader = _Frames(s)
        while True:
            ftype, flags, stream, payload = reader.next()
            if ftype == SETTINGS and not flags & ACK:
                s.sendall(frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                s.sendall(frame(PING, ACK, 0, payload))
            elif ftype == GOAWAY or (ftype == RST_STREAM and stream == 1):
                raise CallError("the daemon closed the call")
            elif stream == 1 and ftype == DATA:
                chunks.append(payload)
                received += len(payload)
                if received > MAX_REPLY:
                    raise CallError(f"the daemon's reply to {method} exceeds {MAX_REPLY} bytes")
                if payload and not flags & END_STREAM:  # give the window back: a reply may exceed 64 KiB
                    increment = len(payload).to_bytes(4, "big")
                    s.sendall(frame(WINDOW_UPDATE, 0, 0, increment) + frame(WINDOW_UPDATE, 0, 1, increment))
            if stream == 1 and ftype in (DATA, HEADERS) and flags & END_STREAM:
                break
    finally:
        s.close()
    data = b"".join(chunks)
    if len(data) < 5:
        raise CallError(f"the daemon did not answer {method} (no reply message)")
    length = int.from_bytes(data[1:5], "big")
    return json.loads(data[5 : 5 + length])


class _Frames:
    def __init__(self, s: _socket.socket) -> None:
        self.s = s
        self.buf = b""

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise CallError("the daemon closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def next(self) -> tuple[int, int, int, bytes]:
        head = self._read(9)
        length = int.from_bytes(head[:3], "big")
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        return head[3], head[4], stream, self._read(length)
