"""HTTP/2 flow control (RFC 9113 §5.2, §6.9) sans I/O: the windows of one connection and of its streams, both
ways. h2conn.Connection (the asyncio adapter) asks it what it may send and what to give back, and turns its
answers into frames and into pausing or resuming the applications' sockets.

- Sending: a new stream may send the peer's INITIAL_WINDOW_SIZE (a SETTINGS change moves every open stream's
  window by the difference), the connection what the peer's WINDOW_UPDATEs gave; a window past 2^31-1 is a
  FLOW_CONTROL_ERROR (the connection's ends the connection, a stream's resets the stream).
- Receiving: we let the peer send WINDOW per stream and per connection (4 MiB: HTTP/2's 64 KiB default would
  cap a stream at one window per round trip). DATA beyond either window is a FLOW_CONTROL_ERROR. What was
  used is given back once half of it is: the connection's at once, a stream's only while its application
  keeps up (a slow reader holds back its own stream, never the connection's others), and never for a stream
  the peer has ended. Padding counts against the windows and is given back with the data.
"""

from __future__ import annotations

from dataclasses import dataclass

from noded.tunnel import frames as f
from noded.tunnel.frames import ErrorCode, H2Error

WINDOW = 4 * 1024 * 1024


@dataclass(slots=True)
class StreamWindows:
    id: int
    send: int  # what we may still send on the stream
    recv: int = WINDOW  # what the peer may still send us on it
    unacked: int = 0  # received and delivered (or padding), not yet given back


class FlowControl:
    """The windows of one connection; each stream's are a StreamWindows it made."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.peer_initial = f.DEFAULT_WINDOW  # the peer's INITIAL_WINDOW_SIZE: a new stream's send window
        self.send = f.DEFAULT_WINDOW  # the peer's connection window for us; WINDOW_UPDATEs grow it
        self.recv = window
        self.unacked = 0

    def opening_update(self) -> int:
        """The connection's WINDOW_UPDATE to send with our SETTINGS: from HTTP/2's default to ours."""
        return self.window - f.DEFAULT_WINDOW

    def stream(self, stream_id: int) -> StreamWindows:
        return StreamWindows(stream_id, self.peer_initial, self.window)

    # -- sending --------------------------------------------------------------------------------
    def credit(self, stream: StreamWindows) -> int:
        return min(stream.send, self.send)

    def sent(self, stream: StreamWindows, nbytes: int) -> None:
        stream.send -= nbytes
        self.send -= nbytes

    def peer_initial_window(self, value: int, streams: list[StreamWindows]) -> None:
        for stream in streams:
            stream.send += value - self.peer_initial
        self.peer_initial = value

    def connection_update(self, increment: int) -> None:
        self.send += increment
        if self.send > f.MAX_WINDOW:
            raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, "connection window beyond 2^31-1")

    def stream_update(self, stream: StreamWindows, increment: int) -> bool:
        """False: the stream's window went past 2^31-1 (the stream is to be reset)."""
        stream.send += increment
        return stream.send <= f.MAX_WINDOW

    # -- receiving -------------------------------------------------------------------------------
    def data_arrives(self, stream: StreamWindows | None, length: int, padding: int) -> None:
        """A DATA frame of `length` (padding and its length byte included) for `stream` (None: a stream we no
        longer carry, or one the peer had ended: only the connection's window counts it)."""
        self.recv -= length
        if self.recv < 0:
            raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, "peer sent DATA beyond the connection window")
        self.unacked += length
        if stream is not None:
            stream.recv -= length
            if stream.recv < 0:
                raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, "peer sent DATA beyond the stream window")
            stream.unacked += padding  # the payload is counted as it is delivered

    def delivered(self, stream: StreamWindows, nbytes: int) -> None:
        stream.unacked += nbytes

    def due(self, stream: StreamWindows | None, open_: bool, keeping_up: bool) -> list[tuple[int, int]]:
        """The WINDOW_UPDATEs (stream ID, increment) to send now: the connection's once half its window is
        used; the stream's (still open, its application keeping up) once half is used or less than half is
        left."""
        updates = []
        if self.unacked >= self.window // 2:
            updates.append((0, self.unacked))
            self.recv += self.unacked
            self.unacked = 0
        if stream is None or not (stream.unacked and open_ and keeping_up):
            return updates
        if stream.unacked >= self.window // 2 or stream.recv < self.window // 2:
            updates.append((stream.id, stream.unacked))
            stream.recv += stream.unacked
            stream.unacked = 0
        return updates
