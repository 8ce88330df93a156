"""Dict-backed stand-ins for pinned BPF maps: what programs the maps (the eBPF proxier) is unit-tested with
them, without root or a kernel, as kube-proxy tests its proxiers against a fake iptables.

`DictMap` answers the calls of `libbpf.Map` (update, lookup, delete, keys, items and the raw batch calls)
with entries kept as bytes, refuses to grow past `max_entries` as a hash map does (E2BIG), and can be told
to fail from its Nth write on (`fail_from`) to test what a sync does when the kernel refuses it midway.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator

from noded.bpf.libbpf import BpfError
from noded.bpf.sock_lb import MAP_SPECS, LbMaps


class DictMap:
    def __init__(self, key_type: type, value_type: type, name: str = "", max_entries: int = 65536) -> None:
        self.key_type = key_type
        self.value_type = value_type
        self.name = name
        self.max_entries = max_entries
        self.entries: dict[bytes, bytes] = {}
        self.writes = 0  # updates and deletes that took effect
        self.fail_from: int | None = None  # writes from this count on raise, as a refusing kernel would

    def _write(self, key: bytes, value: bytes | None) -> None:
        if self.fail_from is not None and self.writes >= self.fail_from:
            raise BpfError(errno.ENOMEM, f"update {self.name}: refused (fake)")
        if value is None:
            self.entries.pop(key, None)
        else:
            if key not in self.entries and len(self.entries) >= self.max_entries:
                raise BpfError(errno.E2BIG, f"update {self.name}: full")
            self.entries[key] = value
        self.writes += 1

    def update(self, key, value) -> None:
        self._write(bytes(key), bytes(value))

    def update_raw(self, keys: bytes | memoryview, values: bytes | memoryview, count: int) -> None:
        ksize, vsize = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        for i in range(count):
            self._write(bytes(keys[i * ksize : (i + 1) * ksize]), bytes(values[i * vsize : (i + 1) * vsize]))

    def lookup(self, key):
        raw = self.entries.get(bytes(key))
        return None if raw is None else self.value_type.from_buffer_copy(raw)

    def delete(self, key) -> bool:
        raw = bytes(key)
        if raw not in self.entries:
            return False
        self._write(raw, None)
        return True

    def delete_raw(self, keys: bytes, count: int) -> int:
        ksize = ctypes.sizeof(self.key_type)
        return sum(self.delete(keys[i * ksize : (i + 1) * ksize]) for i in range(count))

    def keys(self) -> Iterator:
        for raw in list(self.entries):
            yield self.key_type.from_buffer_copy(raw)

    def items(self) -> Iterator:
        for raw, value in list(self.entries.items()):
            yield self.key_type.from_buffer_copy(raw), self.value_type.from_buffer_copy(value)

    def close(self) -> None:
        pass


def fake_lb_maps(max_entries: int = 65536) -> LbMaps:
    """The socket-LB maps as dicts."""
    return LbMaps(**{field: DictMap(key, value, pin, max_entries) for field, (pin, key, value) in MAP_SPECS.items()})
