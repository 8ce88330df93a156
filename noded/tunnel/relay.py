"""Plain TCP splicing on asyncio protocols: two connected sockets copied into each other with no stream
objects between them. Each side reads into the thread's one buffer (BufferedProtocol, `scratch`) and writes it to the
other side's transport, which sends at once and keeps only what the kernel did not take; a side whose
peer cannot take more stops reading until it can. EOF is passed on as a half-close, and both are closed
once both directions have ended.

`Parked` is the protocol an accepted connection waits under (reading paused) while the daemon decides
where it goes; `take_over` moves its transport to the protocol that serves it.
"""

from __future__ import annotations

import asyncio
import socket
import threading

READ_SIZE = 256 * 1024
_scratch = threading.local()


def scratch(size: int) -> memoryview:
    """This thread's read buffer. A protocol reads into it and passes the bytes on before returning
    (get_buffer and buffer_updated run back to back): one buffer serves every connection of the loop,
    none holds one of its own."""
    view = getattr(_scratch, "view", None)
    if view is None or len(view) < size:
        view = _scratch.view = memoryview(bytearray(max(size, 2 * READ_SIZE)))
    return view


def no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: a small write goes out at once. asyncio sets it only on sockets whose proto field says
    TCP, which sockets made with proto 0 (ours, and those accepted from them) do not."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def live(transport: asyncio.BaseTransport | None) -> bool:
    """A transport that is there and not closing."""
    return transport is not None and not transport.is_closing()


class Parked(asyncio.Protocol):
    """An accepted connection nobody reads yet: `on_accept(transport)` runs, and reading stays paused
    until a protocol takes the transport over (take_over). What it had in flight stays in the kernel."""

    def __init__(self, on_accept) -> None:
        self.on_accept = on_accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        self.on_accept(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def take_over(transport: asyncio.Transport, protocol: asyncio.BaseProtocol) -> None:
    """Hand a parked transport to `protocol` and start reading."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if not transport.is_closing():
        transport.resume_reading()


class Side(asyncio.BufferedProtocol):
    """One socket of a spliced pair (see module doc)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Side | None = None
        self.eof = False  # this side has sent its EOF (passed on to the other)
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)
        self.transport.pause_reading()  # until both sides are there (splice_sockets)

    def get_buffer(self, sizehint: int) -> memoryview:
        return scratch(READ_SIZE)[:READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        other = self.other
        if other is not None and live(other.transport):
            other.transport.write(scratch(READ_SIZE)[:nbytes])  # sent, or what is left copied

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is not None and live(other.transport) and other.transport.can_write_eof():
            other.transport.write_eof()
        if other is None or other.eof:
            self._close_both()
        return True  # still writable: the other direction may go on

    def pause_writing(self) -> None:  # this side's peer is slow: stop reading from the other
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None and not self.other.eof:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)
        other = self.other
        if other is not None and live(other.transport):
            if exc is None:
                other.transport.close()  # flushes what it holds
            else:
                other.transport.abort()

    def _close_both(self) -> None:
        for side in (self, self.other):
            if side is not None and side.transport is not None:
                side.transport.close()


async def splice_sockets(a: asyncio.Transport | socket.socket, b: socket.socket) -> None:
    """Copy between `a` (a parked transport, or a connected socket) and the connected socket `b` until both
    directions have ended."""
    loop = asyncio.get_running_loop()
    left, right = Side(), Side()
    left.other, right.other = right, left
    if isinstance(a, socket.socket):
        await loop.connect_accepted_socket(lambda: left, a)
    else:
        a.set_protocol(left)
        left.connection_made(a)
    await loop.connect_accepted_socket(lambda: right, b)
    for side in (left, right):
        if not side.transport.is_closing():
            side.transport.resume_reading()
    await asyncio.gather(left.done, right.done)
