"""Thread-per-connection servers (socketserver) that hold at most `max_connections` at once: one more is
closed at once, unanswered, and counted (`refused`). For every server a hostile client can reach."""

from __future__ import annotations

import threading


class BoundedConnections:
    """A mixin before socketserver's ThreadingMixIn server classes; set `max_connections` first."""

    max_connections = 32

    def bound(self) -> None:
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self.refused = 0

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.slots.release()
