"""TCP for the tunnel's listeners on asyncio: accepting, connecting, and plain splicing.

`Acceptor` takes connections from a listening socket in the reader callback itself and hands each socket
over at once (asyncio's servers spend a task and two rounds of the loop on each before anyone sees it).
`start_connect` starts a connect that, inside a netns, is usually done when the call returns.

`splice_sockets` copies two connected sockets into each other with no stream objects between them: each
side reads into the thread's one buffer (BufferedProtocol, `scratch`) and writes it to the other side's
transport, which sends at once and keeps only what the kernel did not take; a side whose peer cannot take
more stops reading until it can. EOF is passed on as a half-close, and both are closed once both
directions have ended.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import threading
from collections.abc import Callable, Coroutine

import structlog

log = structlog.get_logger("noded.tunnel.relay")

READ_SIZE = 256 * 1024
ACCEPT_RETRY = 1.0  # seconds an Acceptor waits after accept() failed (EMFILE), as asyncio's servers do
_scratch = threading.local()


def scratch(size: int) -> memoryview:
    """This thread's read buffer. A protocol reads into it and passes the bytes on before returning
    (get_buffer and buffer_updated run back to back): one buffer serves every connection of the loop,
    none holds one of its own."""
    view = getattr(_scratch, "view", None)
    if view is None or len(view) < size:
        view = _scratch.view = memoryview(bytearray(max(size, 2 * READ_SIZE)))
    return view


def spawn(tasks: set[asyncio.Task], coro: Coroutine) -> None:
    """Run `coro` as a task held in `tasks` until it is done (asyncio keeps only weak references)."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _tcp(transport: asyncio.BaseTransport) -> socket.socket | None:
    sock = transport.get_extra_info("socket")
    return sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None


def no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: a small write goes out at once. asyncio sets it only on sockets whose proto field says
    TCP, which sockets made with proto 0 (ours, and those accepted from them) do not."""
    if (sock := _tcp(transport)) is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def keep_alive(transport: asyncio.BaseTransport, idle: int = 180, interval: int = 180, probes: int = 9) -> None:
    """TCP keepalive: a connection whose peer vanished (a node gone without a FIN) is found out and closed,
    after `idle` seconds of silence and `probes` unanswered probes `interval` seconds apart."""
    if (sock := _tcp(transport)) is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)


def live(transport: asyncio.BaseTransport | None) -> bool:
    """A transport that is there and not closing."""
    return transport is not None and not transport.is_closing()


class Acceptor:
    """Connections from `listener` (non-blocking, listening) to `on_socket(sock, address)`, non-blocking
    sockets, as they come; `close()` stops and closes the listener."""

    def __init__(self, listener: socket.socket, on_socket: Callable[[socket.socket, tuple], None]) -> None:
        self.listener = listener
        self.on_socket = on_socket
        self.loop = asyncio.get_running_loop()
        self.retry: asyncio.TimerHandle | None = None
        self.loop.add_reader(listener.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(64):  # a burst at a time; the loop comes back for more
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the connection waits in the backlog, and so do we
                log.warning("accept failed; retrying in a second", error=str(e))
                self.loop.remove_reader(self.listener.fileno())  # else the ready listener spins the loop
                self.retry = self.loop.call_later(ACCEPT_RETRY, self._resume)
                return
            sock.setblocking(False)
            try:
                self.on_socket(sock, address)
            except Exception:
                log.exception("accepted connection not handled")
                sock.close()

    def _resume(self) -> None:
        self.retry = None
        self.loop.add_reader(self.listener.fileno(), self._ready)

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()


def start_connect(sock: socket.socket, address: tuple) -> bool:
    """Start a non-blocking connect; True if it is done already, as one inside the netns usually is by the
    time connect() returns (the handshake ran in the call). OSError if it failed already."""
    err = sock.connect_ex(address)
    if err == 0:
        return True
    if err != errno.EINPROGRESS:
        raise OSError(err, os.strerror(err))
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    if not poller.poll(0):
        return False
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return True


async def finish_connect(sock: socket.socket, address: tuple, timeout: float = 10) -> None:
    """Wait for a connect start_connect started (asyncio's sock_connect picks it up: EALREADY)."""
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout)


class Side(asyncio.BufferedProtocol):
    """One socket of a spliced pair (see module doc)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Side | None = None
        self.eof = False  # this side has sent its EOF (passed on to the other)
        self.done = asyncio.get_running_loop().create_future()
        self.read = 0  # bytes read from this socket (and passed to the other): telemetry

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)
        self.transport.pause_reading()  # until both sides are there (splice_sockets)

    def get_buffer(self, sizehint: int) -> memoryview:
        return scratch(READ_SIZE)[:READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        self.read += nbytes
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


async def splice_sockets(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Copy between the connected sockets `a` and `b` until both directions have ended; the bytes copied
    from a to b and from b to a."""
    loop = asyncio.get_running_loop()
    left, right = Side(), Side()
    left.other, right.other = right, left
    await loop.connect_accepted_socket(lambda: left, a)
    await loop.connect_accepted_socket(lambda: right, b)
    for side in (left, right):
        if not side.transport.is_closing():
            side.transport.resume_reading()
    await asyncio.gather(left.done, right.done)
    return left.read, right.read
