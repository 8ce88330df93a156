"""One asyncio loop on its own thread, shared by the daemon's socket work (capture listeners, DNS)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Coroutine


class LoopThread:
    def __init__(self, name: str = "dataplane") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def run(self, coro: Awaitable, timeout: float = 30) -> object:
        """Run a coroutine on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)  # type: ignore[arg-type]

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Start a long-running coroutine on the loop from another thread; its task (to cancel it)."""

        async def start() -> asyncio.Task:
            return asyncio.ensure_future(coro)

        return self.run(start())  # type: ignore[return-value]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
