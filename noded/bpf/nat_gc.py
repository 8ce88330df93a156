"""NodePort translation state kept in bounds: deletes the noded_nat and noded_nat_new entries whose flow has
expired (closed, unanswered, idle: noded_lb.h's NODED_CT_* timeouts), read and deleted in batches (a few
syscalls for the whole map). The tc programs never use an expired entry anyway; this gives its room back
before the LRU would. Called by the eBPF proxier at every full sync.
"""

from __future__ import annotations

import struct
import time

import structlog

from noded.bpf import structs
from noded.bpf.libbpf import BpfError, Map

log = structlog.get_logger("noded.bpf.nat_gc")

MAPS = ("noded_nat", "noded_nat_new")
SEC = 1_000_000_000
TCP, UDP = 6, 17
# noded_ct_timeout() in bpf/include/noded_lb.h, mirrored (tests/unit/test_nat_timeouts.py compares the two)
TIMEOUTS = {
    (structs.CT_CLOSING, TCP): 10 * SEC,
    (structs.CT_CLOSING, UDP): 10 * SEC,
    (structs.CT_ESTABLISHED, TCP): 21600 * SEC,
    (structs.CT_ESTABLISHED, UDP): 120 * SEC,
}
NEW_TIMEOUT = {TCP: 60 * SEC, UDP: 30 * SEC}
_KEY = struct.Struct("=16s16sHHBBH")  # struct noded_nat_key
_VALUE = struct.Struct("=16s16sHHHBBQII")  # struct noded_nat_val


def timeout(state: int, proto: int) -> int:
    return TIMEOUTS.get((state, proto), NEW_TIMEOUT.get(proto, 30 * SEC))


class NatCollector:
    def __init__(self, bpffs: str) -> None:
        self.bpffs = bpffs
        self.runs = 0
        self.expired = 0
        self.entries = {name: 0 for name in MAPS}  # after the last run
        self.last_seconds = 0.0

    def collect(self, age: float = 0.0) -> int:
        """One pass over both maps; `age` (seconds) collects as if that much later (tests). Returns how
        many entries were deleted."""
        start = time.perf_counter()
        now = time.monotonic_ns() + int(age * SEC)  # CLOCK_MONOTONIC: bpf_ktime_get_ns()'s clock
        deleted = 0
        for name in MAPS:
            try:
                m = Map.open_pinned(f"{self.bpffs}/{name}", structs.NatKey, structs.NatVal)
            except BpfError:
                continue  # not created yet
            try:
                kept = 0
                for keys, values, _count in m.raw_batches():
                    doomed = bytearray()
                    pairs = zip(_VALUE.iter_unpack(values), _KEY.iter_unpack(keys), strict=True)
                    for i, (value, key) in enumerate(pairs):
                        state, seen, proto = value[5], value[7], key[4]
                        if now - seen > timeout(state, proto):
                            doomed += keys[i * _KEY.size : (i + 1) * _KEY.size]
                        else:
                            kept += 1
                    deleted += m.delete_raw(bytes(doomed), len(doomed) // _KEY.size)
                self.entries[name] = kept
            finally:
                m.close()
        self.runs += 1
        self.expired += deleted
        self.last_seconds = time.perf_counter() - start
        if deleted:
            log.info("expired NodePort flows collected", entries=deleted, seconds=round(self.last_seconds, 4))
        return deleted

    def describe(self) -> dict:
        return {
            "runs": self.runs,
            "expired": self.expired,
            "entries": dict(self.entries),
            "lastSeconds": round(self.last_seconds, 4),
        }
