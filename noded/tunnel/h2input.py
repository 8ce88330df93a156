"""HTTP/2's input side sans I/O (RFC 9113 §3.4, §4, §6): the bytes a peer sends, cut into frames and checked,
handed to the connection as calls of `FrameHandler` (h2conn.Connection is the asyncio adapter around it).

What this owns: the client preface, a frame not whole yet (carried to the next read; `need` says how long
the waiting frame is, so the adapter reads it in one go), a header block and its CONTINUATIONs (bounded),
every frame's size and stream rules, and DATA passed through as it arrives: its payload is handed on in
the pieces the reads cut it into (`data`), never gathered first, so it goes from the TLS buffer to the
stream's socket without a copy. What it does not: streams, windows, output, time (the handler's).
"""

from __future__ import annotations

from typing import Protocol

from noded.tunnel import frames as f
from noded.tunnel.frames import ErrorCode, H2Error

FRAME = 1024 * 1024  # the largest frame taken (what we announce as MAX_FRAME_SIZE)
MAX_HEADER_BLOCK = 64 * 1024  # a header block, CONTINUATIONs included (nghttp2's CONTINUATION-flood guard)


class FrameHandler(Protocol):
    def headers(self, stream_id: int, flags: int, block: bytes) -> None: ...

    def data_start(self, stream_id: int, length: int, flags: int, pad: int) -> None: ...

    def data(self, payload: memoryview) -> None: ...

    def data_done(self) -> None: ...

    def window_update(self, stream_id: int, increment: int) -> None: ...

    def settings(self, pairs: list[tuple[int, int]]) -> None: ...

    def ping(self, payload: bytes) -> None: ...

    def rst_stream(self, stream_id: int) -> None: ...

    def goaway(self, last_id: int, code: int) -> None: ...


class FrameReader:
    def __init__(self, handler: FrameHandler, server: bool) -> None:
        self.handler = handler
        self.preface = server  # a server reads the client's connection preface first, not a frame
        self.carry = b""  # input not taken yet (a frame not whole): it goes in front of the next read
        self.need = 0  # a frame this long is waiting to be read whole
        self.continued: tuple[int, int, list[bytes]] | None = None  # a header block awaiting CONTINUATION
        self.data_id = 0  # the stream whose DATA payload is being passed through (0: none)
        self.data_left = 0
        self.pad_left = 0

    def feed(self, view: memoryview, end: int) -> None:
        """Frames from view[:end] (what was carried, then what was read). Raises H2Error: the connection ends."""
        pos = self.need = 0
        if self.preface:
            if end < len(f.PREFACE):
                self.carry = bytes(view[:end])
                return
            if view[: len(f.PREFACE)] != f.PREFACE:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 connection preface")
            pos, self.preface = len(f.PREFACE), False
        handler = self.handler
        while True:
            if self.data_id:
                if self.data_left:
                    k = min(self.data_left, end - pos)
                    if not k:
                        break
                    handler.data(view[pos : pos + k])
                    pos += k
                    self.data_left -= k
                    continue
                if self.pad_left:
                    k = min(self.pad_left, end - pos)
                    if not k:
                        break
                    pos += k
                    self.pad_left -= k
                    continue
                self.data_id = 0
                handler.data_done()
                continue
            if end - pos < 9:
                break
            length = int.from_bytes(view[pos : pos + 3], "big")
            ftype, flags = view[pos + 3], view[pos + 4]
            stream_id = int.from_bytes(view[pos + 5 : pos + 9], "big") & f.MAX_WINDOW
            if length > FRAME:
                raise H2Error(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if self.continued is not None and (ftype != f.CONTINUATION or stream_id != self.continued[0]):
                raise H2Error(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
            if ftype == f.DATA:  # the payload is passed on as it arrives, not read whole first
                if flags & f.PADDED and end - pos < 10:
                    break
                self._data_start(stream_id, length, flags, view[pos + 9] if flags & f.PADDED else 0)
                pos += 10 if flags & f.PADDED else 9
                continue
            if end - pos < 9 + length:
                self.need = 9 + length
                break
            self._frame(ftype, flags, stream_id, view[pos + 9 : pos + 9 + length])
            pos += 9 + length
        self.carry = bytes(view[pos:end])

    def _data_start(self, stream_id: int, length: int, flags: int, pad: int) -> None:
        if flags & f.PADDED and pad >= length:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"DATA frame of {length} bytes with padding {pad}")
        if not stream_id:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self.handler.data_start(stream_id, length, flags, pad)
        self.data_id = stream_id
        self.data_left = length - (1 + pad if flags & f.PADDED else 0)
        self.pad_left = pad

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: memoryview) -> None:
        """Every frame but DATA, read whole."""
        handler = self.handler
        if ftype == f.HEADERS:
            if not stream_id:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
            fragment = f.header_fragment(flags, payload)
            if len(fragment) > MAX_HEADER_BLOCK:
                raise H2Error(ErrorCode.ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
            if flags & f.END_HEADERS:
                handler.headers(stream_id, flags, fragment)
            else:
                self.continued = (stream_id, flags, [fragment])
        elif ftype == f.CONTINUATION:
            if self.continued is None:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self.continued[2].append(bytes(payload))
            if sum(len(part) for part in self.continued[2]) > MAX_HEADER_BLOCK:
                raise H2Error(ErrorCode.ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
            if flags & f.END_HEADERS:
                stream_id, first_flags, parts = self.continued
                self.continued = None
                handler.headers(stream_id, first_flags, b"".join(parts))
        elif ftype == f.WINDOW_UPDATE:
            if len(payload) != 4:
                raise H2Error(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of another size than 4")
            handler.window_update(stream_id, int.from_bytes(payload, "big") & f.MAX_WINDOW)
        elif ftype == f.SETTINGS:
            if stream_id:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & f.ACK:
                handler.settings(f.parse_settings(payload))
        elif ftype == f.PING:
            if len(payload) != 8:
                raise H2Error(ErrorCode.FRAME_SIZE_ERROR, "PING of another size than 8")
            if not flags & f.ACK:
                handler.ping(bytes(payload))
        elif ftype == f.RST_STREAM:
            handler.rst_stream(stream_id)
        elif ftype == f.GOAWAY:
            if len(payload) < 8 or stream_id:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, "GOAWAY shorter than 8 bytes, or on a stream")
            handler.goaway(int.from_bytes(payload[0:4], "big") & f.MAX_WINDOW, int.from_bytes(payload[4:8], "big"))
        elif ftype == f.PUSH_PROMISE:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE (push is off)")
        # PRIORITY and frame types we do not know are ignored, as RFC 9113 says
