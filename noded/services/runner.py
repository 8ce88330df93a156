"""Bounded-frequency sync runner, after kube-proxy's.

`Schedule` decides, sans I/O, from the times it is told: requests coalesce into one sync, syncs keep a
minimum gap (measured from the end of the last), a full sync comes at least every `max_interval`, and a
failed sync is retried as a full one after `retry_interval` (sooner if another request comes). The runner
is the thin thread around it: it asks the schedule when to wake, calls the sync, and reports the outcome.
The clock is injected, so the schedule is tested with a fake one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("noded.services.runner")


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


class BoundedFrequencyRunner:
    def __init__(
        self,
        name: str,
        fn: Callable[[bool], object],
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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sync-{name}", daemon=True)
        self.last_sync: float = 0.0
        self.last_duration: float = 0.0
        self.last_error: str | None = None
        self.syncs = 0

    def start(self) -> None:
        with self._lock:
            self.schedule.request(self._clock())  # the first sync is always a full one
        self._wake.set()
        self._thread.start()

    def run(self) -> None:
        """Ask for a sync soon (coalesced with other requests)."""
        with self._lock:
            self.schedule.request(self._clock())
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started (noded may stop before its sources synced)
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                full = self.schedule.take(self._clock())
                wait = self.schedule.next_at() - self._clock()
            if full is None:
                self._wake.wait(max(0.0, min(wait, 3600.0)))
                self._wake.clear()
                continue
            start = self._clock()
            ok = True
            try:
                self._fn(full)
                self.last_error = None
            except Exception as e:  # a failed sync is retried; the daemon keeps running
                ok = False
                self.last_error = str(e)
                log.exception("sync failed", runner=self.name, full=full)
            self.last_sync = self._clock()
            self.last_duration = self.last_sync - start
            self.syncs += 1
            with self._lock:
                self.schedule.finished(self.last_sync, full, ok)
