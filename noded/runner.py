"""The one bounded-frequency runner, after kube-proxy's: what drives every loop that keeps a kernel or
file table in step (the services' proxier and the pods' capture on threads; the DNS fast path's records and
links and the workload certificates on the daemon's event loop).

`Schedule` decides, sans I/O, from the times it is told: requests coalesce into one sync, syncs keep a
minimum gap (measured from the end of the last), a full sync comes at least every `max_interval`, and a
failed sync is retried as a full one after `retry_interval` (sooner if another request comes). The two
adapters are thin: `BoundedFrequencyRunner` a thread, `AsyncRunner` a task; each asks the schedule when to
wake, calls the sync, and reports the outcome. A sync that raises `NotYet` (what it needs is not there, as
the DNS records before the sources synced) is retried like a failed one, without an error. The clock is
injected, so the schedule is tested with a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("noded.runner")


class Schedule:
    def __init__(self, min_interval: float, max_interval: float, retry_interval: float, now: float) -> None:
        self.min = min_interval
        self.max = max_interval
        self.retry = retry_interval
        self.due_at = now  # the first sync: at once, and full
        self.full = True
        self.last_end = -math.inf
        self.next_full = now + max_interval

    def request(self, now: float) -> None:
        """Something changed: a sync is wanted (coalesced with any already wanted)."""
        self.due_at = min(self.due_at, now)

    def next_at(self) -> float:
        """When the next sync may run: a wanted one once the minimum gap has passed; the periodic full."""
        wanted = max(self.due_at, self.last_end + self.min) if self.due_at < math.inf else math.inf
        return min(wanted, self.next_full)

    def take(self, now: float) -> bool | None:
        """A sync starts now if one is due: whether it is full; None when nothing is due yet."""
        if now < self.next_at():
            return None
        full = self.full or now >= self.next_full
        self.full = False
        self.due_at = math.inf
        return full

    def finished(self, now: float, full: bool, ok: bool) -> None:
        self.last_end = now
        if full:
            self.next_full = now + self.max
        if not ok:  # retried as a full sync: what the kernel holds is not known
            self.full = True
            self.due_at = min(self.due_at, now + self.retry)


class NotYet(Exception):
    """A sync that cannot run yet: retried after the retry interval, as a full one, and not an error."""


class _Runs:
    """What both adapters share: the sync (`fn(full)`: a function, or for AsyncRunner a coroutine function),
    the schedule behind a lock, and each sync's outcome."""

    def __init__(
        self,
        name: str,
        fn: Callable[[bool], Any],
        min_interval: float,
        max_interval: float,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._fn = fn
        self._clock = clock
        self.schedule = Schedule(min_interval, max_interval, retry_interval, clock())
        self._lock = threading.Lock()
        self.last_sync: float = 0.0
        self.last_duration: float = 0.0
        self.last_error: str | None = None
        self.syncs = 0

    def _request(self) -> None:
        with self._lock:
            self.schedule.request(self._clock())

    def _take(self) -> tuple[bool | None, float]:
        """Whether a sync starts now (and whether full), else None; and how long until the next is due."""
        with self._lock:
            full = self.schedule.take(self._clock())
            return full, self.schedule.next_at() - self._clock()

    def _finished(self, started: float, full: bool, error: BaseException | None) -> None:
        if error is None:
            self.last_error = None
        elif isinstance(error, NotYet):
            log.debug("sync not yet possible", runner=self.name, reason=str(error))
        else:  # a failed sync is retried; the daemon keeps running. The same failure again is logged once.
            message = str(error) or type(error).__name__
            if message != self.last_error:
                log.error("sync failed", runner=self.name, full=full, exc_info=error)
            self.last_error = message
        self.last_sync = self._clock()
        self.last_duration = self.last_sync - started
        if not isinstance(error, NotYet):
            self.syncs += 1
        with self._lock:
            self.schedule.finished(self.last_sync, full, error is None)


class BoundedFrequencyRunner(_Runs):
    """The schedule driving a sync on its own thread (`run()` from any thread)."""

    _fn: Callable[[bool], object]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sync-{self.name}", daemon=True)

    def start(self) -> None:
        self._request()  # the first sync is always a full one
        self._wake.set()
        self._thread.start()

    def run(self) -> None:
        """Ask for a sync soon (coalesced with other requests)."""
        self._request()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started (noded may stop before its sources synced)
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            full, wait = self._take()
            if full is None:
                self._wake.wait(max(0.0, min(wait, 3600.0)))
                self._wake.clear()
                continue
            started, error = self._clock(), None
            try:
                self._fn(full)
            except Exception as e:
                error = e
            self._finished(started, full, error)


class AsyncRunner(_Runs):
    """The schedule driving an async sync as a task on an event loop (`run()` from any thread)."""

    _fn: Callable[[bool], Awaitable[object]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on `loop` (from any thread); the first sync is a full one, at once."""
        self._loop = loop
        self._request()
        loop.call_soon_threadsafe(self._begin)

    def run(self) -> None:
        """Ask for a sync soon (coalesced with other requests); from any thread."""
        self._request()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._poke)

    def stop(self) -> None:
        """From any thread: the task is cancelled."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel)

    def _begin(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sync-{self.name}")

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            full, wait = self._take()
            if full is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, min(wait, 3600.0)))
                self._wake.clear()
                continue
            started, error = self._clock(), None
            try:
                await self._fn(full)
            except Exception as e:
                error = e
            self._finished(started, full, error)
