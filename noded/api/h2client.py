"""A unary gRPC call over HTTP/2 cleartext on a unix socket, in the standard library only.

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

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
MAX_REPLY = 64 << 20  # a reply larger than this is refused (the daemon's status at 5,000 services is ~3 MiB)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class CallError(Exception):
    pass


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK integer with an N-bit prefix; `first` holds the pattern bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def _string(s: str) -> bytes:
    raw = s.encode()
    return _int(len(raw), 7, 0) + raw


def _literal(name: str | int, value: str) -> bytes:
    """Literal header field without indexing: by static-table name index, or a new name."""
    if isinstance(name, int):
        return _int(name, 4, 0) + _string(value)
    return b"\x00" + _string(name) + _string(value)


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def request_headers(path: str, authority: str = "localhost") -> bytes:
    return (
        b"\x83"  # :method POST (static 3)
        + b"\x86"  # :scheme http (static 6)
        + _literal(4, path)  # :path
        + _literal(1, authority)  # :authority
        + _literal(31, "application/grpc+json")  # content-type
        + _literal("te", "trailers")
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
            + _frame(SETTINGS, 0, 0)
            + _frame(HEADERS, END_HEADERS, 1, request_headers(method))
            + _frame(DATA, END_STREAM, 1, b"\x00" + len(body).to_bytes(4, "big") + body)
        )
        chunks: list[bytes] = []
        received = 0
        reader = _Frames(s)
        while True:
            ftype, flags, stream, payload = reader.next()
            if ftype == SETTINGS and not flags & ACK:
                s.sendall(_frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                s.sendall(_frame(PING, ACK, 0, payload))
            elif ftype == GOAWAY or (ftype == RST_STREAM and stream == 1):
                raise CallError("the daemon closed the call")
            elif stream == 1 and ftype == DATA:
                chunks.append(payload)
                received += len(payload)
                if received > MAX_REPLY:
                    raise CallError(f"the daemon's reply to {method} exceeds {MAX_REPLY} bytes")
                if payload and not flags & END_STREAM:  # give the window back: a reply may exceed 64 KiB
                    increment = len(payload).to_bytes(4, "big")
                    s.sendall(_frame(WINDOW_UPDATE, 0, 0, increment) + _frame(WINDOW_UPDATE, 0, 1, increment))
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
