"""Desired against held: the one diff every kernel table noded keeps goes through.

A table (a BPF map, the pinned links under bpffs, a frontend's slots, a service's DNS records) is held as
{key: value} and wanted as {key: value}. `changes` says, sans I/O, what to write and what to delete;
`reconcile` applies that through the table's own write and delete, writes first (so the datapath never
loses an entry it still needs while its replacement is pending) then deletes.

- A held value of None is not known (a key read back without its value): it is written again.
- `prune=False` keeps held keys nobody wants (a table whose other owners are not known yet: at start,
  until the first full sync names them).
- A table whose keys name their values (a link's pin names its interface and program) is held with
  `held_by_name`: a present key is as wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_ABSENT = object()


@dataclass(slots=True)
class Changes(Generic[K, V]):
    write: dict[K, V] = field(default_factory=dict)
    delete: list[K] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.write) + len(self.delete)


def changes(held: Mapping[K, V | None], wanted: Mapping[K, V], prune: bool = True) -> Changes[K, V]:
    """What makes `held` into `wanted`: the keys to write (new, changed or not known) and to delete."""
    out: Changes[K, V] = Changes()
    for key, value in wanted.items():
        have = held.get(key, _ABSENT)
        if have is None or have is _ABSENT or have != value:
            out.write[key] = value
    if prune:
        out.delete = [key for key in held if key not in wanted]
    return out


def reconcile(
    held: Mapping[K, V | None],
    wanted: Mapping[K, V],
    write: Callable[[K, V], object],
    delete: Callable[[K], object],
    prune: bool = True,
) -> Changes[K, V]:
    """Apply `changes(held, wanted, prune)`: every write, then every delete; returns what was done."""
    todo = changes(held, wanted, prune)
    for key, value in todo.write.items():
        write(key, value)
    for key in todo.delete:
        delete(key)
    return todo


def reconcile_map(table, wanted: Mapping[bytes, bytes], prune: bool = True) -> Changes[bytes, bytes]:
    """A BPF map (noded/bpf/libbpf.Map, or its dict-backed fake) made to hold `wanted`, {packed key: packed
    value}, against what it holds read back whole: for the small maps written as a set (cluster CIDRs, the
    DNS listen addresses)."""
    key_type, value_type = table.key_type, table.value_type
    return reconcile(
        {bytes(key): bytes(value) for key, value in table.items()},
        wanted,
        lambda raw, value: table.update(key_type.from_buffer_copy(raw), value_type.from_buffer_copy(value)),
        lambda raw: table.delete(key_type.from_buffer_copy(raw)),
        prune,
    )


def held_by_name(present: Iterable[K], wanted: Mapping[K, V]) -> dict[K, V | None]:
    """A table whose keys name their values: what is present is as wanted (unwanted keys' values unknown)."""
    return {key: wanted.get(key) for key in present}
