"""HTTP/2's wire primitives (RFC 9113 §4, RFC 7541 §5-6), in the standard library's builtins only: frame
types and flags, the preface, a frame's bytes, and HPACK's stateless encoding (integers, strings, literal
fields without indexing, never Huffman). Shared by the tunnel (noded/tunnel/frames.py builds on it) and by
noded-cni's gRPC client (noded/api/h2client.py), which must start fast: nothing is imported here.
"""

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_SIZE = 9

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20


def header(buf: bytearray | memoryview, length: int, ftype: int, flags: int, stream_id: int) -> None:
    """Write a frame header into buf[0:9]."""
    buf[0:3] = length.to_bytes(3, "big")
    buf[3] = ftype
    buf[4] = flags
    buf[5:9] = stream_id.to_bytes(4, "big")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    out = bytearray(HEADER_SIZE)
    header(out, len(payload), ftype, flags, stream_id)
    return bytes(out + payload)


def integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1: `value` with an N-bit prefix, `first` holding the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def string(text: str) -> bytes:
    """RFC 7541 §5.2, never Huffman."""
    raw = text.encode()
    return integer(len(raw), 7) + raw


def literal(name: str | int, value: str) -> bytes:
    """RFC 7541 §6.2.2, a literal field without indexing: its name by static-table index, or written out."""
    return (integer(name, 4) if isinstance(name, int) else b"\x00" + string(name)) + string(value)
