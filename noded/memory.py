"""Giving memory back to the system after a start's one-off work (the first lists, a full sync's plan, the DNS
zone's first build): a collection, then glibc's malloc_trim, since CPython frees its own arenas only once empty."""

from __future__ import annotations

import contextlib
import ctypes
import gc


def release_memory() -> None:
    """What was parsed and dropped given back to the system (called once per start-up step, never per change)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
