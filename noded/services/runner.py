"""Bounded-frequency sync runner, after kube-proxy's.

Coalesces requests, keeps a minimum gap, forces a periodic full sync, retries failures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("noded.services.runner")


class BoundedFrequencyRunner:
    def __init__(
        self,
        name: str,
        fn: Callable[[bool], object],
        min_interval: float,
        max_interval: float,
        retry_interval: float = 1.0,
    ) -> None:
        self.name = name
        self._fn = fn
        self._min = min_interval
        self._max = max_interval
        self._retry = retry_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._full = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sync-{name}", daemon=True)
        self.last_sync: float = 0.0
        self.last_duration: float = 0.0
        self.last_error: str | None = None
        self.syncs = 0

    def start(self) -> None:
        self._full.set()  # the first sync is always a full one
        self._wake.set()
        self._thread.start()

    def run(self) -> None:
        """Ask for a sync soon (coalesced with other requests)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started (noded may stop before its sources synced)
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        next_full = time.monotonic() + self._max
        while not self._stop.is_set():
            timeout = max(0.0, next_full - time.monotonic())
            self._wake.wait(timeout)
            if self._stop.is_set():
                return
            self._wake.clear()
            gap = self._min - (time.monotonic() - self.last_sync)
            if gap > 0:
                time.sleep(gap)
            full = self._full.is_set() or time.monotonic() >= next_full
            self._full.clear()
            start = time.monotonic()
            try:
                self._fn(full)
                self.last_error = None
            except Exception as e:  # a failed sync is retried; the daemon keeps running
                self.last_error = str(e)
                log.exception("sync failed", runner=self.name, full=full)
                self._full.set()
                threading.Timer(self._retry, self._wake.set).start()
            self.last_sync = time.monotonic()
            self.last_duration = self.last_sync - start
            self.syncs += 1
            if full:
                next_full = self.last_sync + self._max
