"""Giving memory back to the system after a start's one-off work (the first lists, a full sync's plan, the DNS
zone's first build): a collection, then glibc's malloc_trim, since CPython frees its own arenas only once empty.
And `fixed_mmap_threshold`: glibc raises its mmap threshold to the size of any large block freed (up to 32 MiB),
so after a full sync's 12 MiB script had gone, every later large block came from the heap and stayed there:
the nftables daemon at 10,000 services held 7.6 MiB more for having freed its script."""

from __future__ import annotations

import contextlib
import ctypes
import gc


def release_memory() -> None:
    """What was parsed and dropped given back to the system (called once per start-up step, never per change)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024  # bytes: larger blocks are mapped on their own, and unmapped when freed


def fixed_mmap_threshold() -> None:
    """Large blocks always mapped on their own (setting the threshold turns its dynamic raising off)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
