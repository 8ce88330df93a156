"""HTTP/2 frames as HBONE uses them (RFC 9113), sans I/O: the frame types, flags, error codes and settings,
builders for every frame noded sends, and the parsers for the payloads it reads.

Header blocks are encoded statelessly: literal fields without indexing (RFC 7541 §6.2.2), never Huffman,
names from the static table where it has them, after one dynamic-table size update to 0 at the start of a
connection's first block, so nothing the peer announces about its table concerns us. They are decoded with
`hpack` (the peer may use all of HPACK).
"""

from __future__ import annotations

import enum

from noded.h2wire import (  # noqa: F401 (the tunnel's frame vocabulary, re-exported: h2conn.py, hbone.py use f.X)
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADER_SIZE,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    header,
    literal,
)

DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
MAX_WINDOW = 2**31 - 1

HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class H2Error(Exception):
    """A connection error: the connection ends with GOAWAY carrying `code`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in values.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def rst_stream(stream_id: int, code: ErrorCode) -> bytes:
    return frame(RST_STREAM, 0, stream_id, int(code).to_bytes(4, "big"))


def goaway(last_stream_id: int, code: ErrorCode, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + int(code).to_bytes(4, "big") + debug)


def end_stream(stream_id: int) -> bytes:
    return frame(DATA, END_STREAM, stream_id)


# RFC 7541 Appendix A: the static table's entries for the names noded sends
_STATIC_NAMES = {":authority": 1, ":method": 2, ":path": 4, ":scheme": 6, ":status": 8}
_TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update to 0 (RFC 7541 §6.3)


def header_block(fields: list[tuple[str, str]], first: bool) -> bytes:
    """The HPACK block for `fields`; `first`: the connection's first block (it starts with the size update)."""
    out = bytearray(_TABLE_SIZE_ZERO if first else b"")
    for name, value in fields:
        out += literal(_STATIC_NAMES.get(name) or name, value)
    return bytes(out)


def headers(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS (and CONTINUATION frames where the block is larger than the peer's frame size)."""
    chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = bytearray()
    for i, chunk in enumerate(chunks):
        flags = END_HEADERS if i == len(chunks) - 1 else 0
        if i == 0:
            out += frame(HEADERS, flags | (END_STREAM if end_stream else 0), stream_id, chunk)
        else:
            out += frame(CONTINUATION, flags, stream_id, chunk)
    return bytes(out)


def parse_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise H2Error(ErrorCode.FRAME_SIZE_ERROR, f"SETTINGS payload of {len(payload)} bytes")
    pairs = [
        (int.from_bytes(payload[i : i + 2], "big"), int.from_bytes(payload[i + 2 : i + 6], "big"))
        for i in range(0, len(payload), 6)
    ]
    for key, value in pairs:
        if key == ENABLE_PUSH and value > 1:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
        if key == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE {value}")
        if key == MAX_FRAME_SIZE and not DEFAULT_FRAME <= value <= 2**24 - 1:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
    return pairs


def header_fragment(flags: int, payload: bytes | memoryview) -> bytes:
    """A HEADERS payload without its padding and priority fields."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, "HEADERS padded without a pad length")
        start, end = 1, end - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    if end < start:
        raise H2Error(ErrorCode.PROTOCOL_ERROR, "HEADERS padding longer than the frame")
    return bytes(payload[start:end])
