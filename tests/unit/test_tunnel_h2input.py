"""HTTP/2's input side sans I/O (noded/tunnel/h2input.py): whatever the reads cut the bytes into, the
connection hears the same frames; DATA is passed through in pieces, never gathered; malformed input ends
the connection with the error RFC 9113 names."""

from __future__ import annotations

import random

import pytest

from noded.tunnel import frames as f
from noded.tunnel.frames import ErrorCode, H2Error
from noded.tunnel.h2input import MAX_HEADER_BLOCK, FrameReader


class Recorder:
    """A FrameHandler that writes down what it is told (DATA pieces joined per frame)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def headers(self, stream_id, flags, block):
        self.calls.append(("headers", stream_id, flags & f.END_STREAM, bytes(block)))

    def data_start(self, stream_id, length, flags, pad):
        self.calls.append(("data", stream_id, flags & f.END_STREAM, b""))

    def data(self, payload):
        kind, stream_id, end, got = self.calls[-1]
        self.calls[-1] = (kind, stream_id, end, got + bytes(payload))

    def data_done(self):
        self.calls.append(("data done",))

    def window_update(self, stream_id, increment):
        self.calls.append(("window", stream_id, increment))

    def settings(self, pairs):
        self.calls.append(("settings", tuple(pairs)))

    def ping(self, payload):
        self.calls.append(("ping", payload))

    def rst_stream(self, stream_id):
        self.calls.append(("rst", stream_id))

    def goaway(self, last_id, code):
        self.calls.append(("goaway", last_id, code))


def feed(data: bytes, cuts: list[int], server: bool = True) -> list[tuple]:
    """`data` fed as the reads would hand it: pieces ending at `cuts`, each after what was carried."""
    rec = Recorder()
    reader = FrameReader(rec, server=server)
    start = 0
    for end in [*cuts, len(data)]:
        piece = data[start:end]
        buf = bytearray(reader.carry + piece)
        reader.feed(memoryview(buf), len(buf))
        start = end
    return rec.calls


BLOCK = f.header_block([(":method", "CONNECT"), (":authority", "10.0.0.1:80")], first=True)
CONVERSATION = (
    f.PREFACE
    + f.settings({f.INITIAL_WINDOW_SIZE: 1 << 20})
    + f.headers(1, BLOCK, end_stream=False, max_frame=7)  # a HEADERS and CONTINUATIONs
    + f.frame(f.DATA, 0, 1, b"hello " * 50)
    + f.frame(f.DATA, f.PADDED | f.END_STREAM, 1, bytes([3]) + b"world" + b"\0\0\0")
    + f.window_update(0, 1000)
    + f.frame(f.PING, 0, 0, b"12345678")
    + f.frame(f.PRIORITY, 0, 1, b"\0" * 5)  # ignored
    + f.rst_stream(3, ErrorCode.CANCEL)
    + f.goaway(1, ErrorCode.NO_ERROR)
)
EXPECTED = [
    ("settings", ((f.INITIAL_WINDOW_SIZE, 1 << 20),)),
    ("headers", 1, 0, BLOCK),
    ("data", 1, 0, b"hello " * 50),
    ("data done",),
    ("data", 1, f.END_STREAM, b"world"),
    ("data done",),
    ("window", 0, 1000),
    ("ping", b"12345678"),
    ("rst", 3),
    ("goaway", 1, 0),
]


def test_the_frames_are_the_same_however_the_input_is_cut():
    assert feed(CONVERSATION, []) == EXPECTED
    assert feed(CONVERSATION, list(range(1, len(CONVERSATION)))) == EXPECTED  # a byte at a time
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(CONVERSATION)), rng.randint(1, 30)))
        assert feed(CONVERSATION, cuts) == EXPECTED, cuts


def test_a_frame_not_whole_is_carried_and_its_length_announced():
    rec = Recorder()
    reader = FrameReader(rec, server=False)
    ping = f.frame(f.PING, 0, 0, b"abcdefgh")
    reader.feed(memoryview(bytearray(ping[:12])), 12)
    assert reader.carry == ping[:12] and reader.need == len(ping) and rec.calls == []


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.PROTOCOL_ERROR),  # no preface
        (f.PREFACE + f.frame(f.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),  # DATA on stream 0
        (f.PREFACE + f.frame(f.DATA, f.PADDED, 1, bytes([5]) + b"ab"), ErrorCode.PROTOCOL_ERROR),  # pad > length
        (f.PREFACE + f.frame(f.HEADERS, 0, 1, BLOCK) + f.frame(f.PING, 0, 0, b"1" * 8), ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(f.CONTINUATION, f.END_HEADERS, 1, BLOCK), ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(f.WINDOW_UPDATE, 0, 0, b"\0\0\1"), ErrorCode.FRAME_SIZE_ERROR),
        (f.PREFACE + f.frame(f.PING, 0, 0, b"short"), ErrorCode.FRAME_SIZE_ERROR),
        (f.PREFACE + f.frame(f.SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(f.GOAWAY, 0, 0, b"\0\0"), ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\0\0\0\2"), ErrorCode.PROTOCOL_ERROR),
        (f.PREFACE + (2 << 20).to_bytes(3, "big") + bytes([f.PING, 0]) + b"\0\0\0\0", ErrorCode.FRAME_SIZE_ERROR),
        (
            f.PREFACE
            + f.frame(f.HEADERS, 0, 1, b"\0" * 60_000)
            + f.frame(f.CONTINUATION, 0, 1, b"\0" * (MAX_HEADER_BLOCK - 59_999)),
            ErrorCode.ENHANCE_YOUR_CALM,  # the CONTINUATION-flood bound
        ),
    ],
)
def test_malformed_input_is_a_connection_error_with_its_code(data, code):
    with pytest.raises(H2Error) as raised:
        feed(data, [])
    assert raised.value.code == code
