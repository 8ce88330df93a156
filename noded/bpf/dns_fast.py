"""The DNS fast path's kernel side: loads bpf/dns.c, pins its maps and tcx links, fills noded_dns and
noded_dns_cache.

`sync(records)` makes the map hold exactly the zone's A/AAAA answers (ClusterZone.address_records, by
service), `update(records)` rewrites just the services that changed; names longer than the program reads or
with more addresses than it answers are left out, so userspace answers them. `learned(reply, stored,
expires)` puts one answer the resolver got upstream into the in-kernel cache (`cached_entry` turns the
resolver's reply bytes into the map value). Links are pinned as `links/dns-<ifname>-<ifindex>`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os

import dns.name
import structlog

from noded.bpf import structs
from noded.bpf.libbpf import BPF_TCX_INGRESS, Map, Object, attach_tcx_pinned
from noded.bpf.sock_lb import LINKS_DIR, ensure_bpffs, object_path
from noded.dns.wire import question_name_end
from noded.model.tracker import ServiceKey
from noded.reconcile import held_by_name, reconcile, reconcile_map

log = structlog.get_logger("noded.bpf.dns")
OBJECT = "dns.o"
LINK_PREFIX = "dns-"
A, AAAA = 1, 28
STATS = {  # noded_dns_stats' keys (noded_dns.h's enum, mirrored in structs.py)
    "answered": structs.DNS_STAT_ANSWERED,
    "passed": structs.DNS_STAT_PASSED,
    "cachedAnswered": structs.DNS_STAT_CACHED,
    "cacheExpired": structs.DNS_STAT_EXPIRED,
}


def _possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        return int(f.read().strip().split("-")[-1]) + 1


def record_key(name: str, qtype: int) -> structs.DnsKey | None:
    wire = dns.name.from_text(name).to_wire().lower()
    if len(wire) > structs.DNS_NAME_MAX:
        return None
    key = structs.DnsKey(qtype=qtype)
    ctypes.memmove(key.name, wire, len(wire))
    return key


def record_value(addresses: list[str], ttl: int) -> structs.DnsVal | None:
    if not 0 < len(addresses) <= structs.DNS_ADDRS_MAX:
        return None
    val = structs.DnsVal(ttl=ttl, count=len(addresses))
    for i, ip in enumerate(addresses):
        packed = ipaddress.ip_address(ip).packed
        ctypes.memmove(val.addr[i], packed, len(packed))
    return val


def cached_entry(reply: bytes, stored: float, expires: float) -> tuple[structs.DnsKey, structs.DnsCached] | None:
    """The cache map's key and value for a reply to a plain query (one A or AAAA question, class IN, no
    EDNS), as the resolver writes it; None for what the program would not serve (a name or answer longer
    than it holds, more records than it ages, a compressed or cut question). Times: CLOCK_MONOTONIC s."""
    name_end = question_name_end(reply) if reply[4:6] == b"\0\1" else None
    if name_end is None or name_end + 4 > len(reply) or name_end - 12 > structs.DNS_NAME_MAX:
        return None
    name, end = reply[12:name_end], name_end + 4
    qtype, qclass = int.from_bytes(reply[end - 4 : end - 2], "big"), int.from_bytes(reply[end - 2 : end], "big")
    data = reply[end:]
    counts = [int.from_bytes(reply[i : i + 2], "big") for i in (6, 8, 10)]
    offsets = _ttl_offsets(reply, end, sum(counts))
    if qtype not in (A, AAAA) or qclass != 1 or offsets is None or len(data) > structs.DNS_CACHE_DATA:
        return None
    if len(offsets) > structs.DNS_CACHE_TTLS:
        return None
    key = structs.DnsKey(qtype=qtype)
    ctypes.memmove(key.name, name.lower(), len(name))
    val = structs.DnsCached(
        stored_ns=round(stored * 1e9),
        expires_ns=round(expires * 1e9),
        len=len(data),
        flags2=reply[3],
        nttl=len(offsets),
        ancount=counts[0],
        nscount=counts[1],
        arcount=counts[2],
    )
    for i, off in enumerate(offsets):
        val.ttl_off[i] = off
    ctypes.memmove(val.data, data, len(data))
    return key, val


def _ttl_offsets(wire: bytes, start: int, records: int) -> list[int] | None:
    """Where each record's TTL sits, relative to start; None when the records do not parse."""
    out, pos = [], start
    for _ in range(records):
        while True:  # the owner name: labels, ended by the root or a pointer
            if pos >= len(wire):
                return None
            length = wire[pos]
            if length == 0:
                pos += 1
                break
            if length & 0xC0 == 0xC0:
                pos += 2
                break
            if length > 63:
                return None
            pos += 1 + length
        if pos + 10 > len(wire):
            return None
        out.append(pos + 4 - start)
        pos += 10 + int.from_bytes(wire[pos + 8 : pos + 10], "big")
    return out if pos == len(wire) else None


class DnsFastPath:
    def __init__(self, bpffs: str) -> None:
        self.bpffs = bpffs
        ensure_bpffs(bpffs)
        os.makedirs(f"{bpffs}/{LINKS_DIR}", exist_ok=True)
        self.obj = Object(object_path(OBJECT))
        self.obj.pin_maps_under(bpffs)
        self.obj.load()
        self.program = next(prog for name, _s, prog in self.obj.programs() if name == "noded_dns_fast")
        self.records = Map.open_pinned(f"{bpffs}/noded_dns", structs.DnsKey, structs.DnsVal)
        self.cache = Map.open_pinned(f"{bpffs}/noded_dns_cache", structs.DnsKey, structs.DnsCached)
        self.listen = Map.open_pinned(f"{bpffs}/noded_dns_listen", structs.DnsListenKey, ctypes.c_uint32)
        self.stats_map = Map.open_pinned(
            f"{bpffs}/noded_dns_stats", ctypes.c_uint32, ctypes.c_uint64 * _possible_cpus()
        )
        self._linked: set[str] = set()  # link pins this object attached (its program)
        self._held: dict[ServiceKey, tuple[bytes, ...]] = {}  # each service's map keys, as written
        self.writes = 0
        self.cached = 0  # answers put into noded_dns_cache

    def set_listen(self, addresses: list[tuple[str, int]], prune: bool = True) -> None:
        """The addresses the fast path answers for; prune=False keeps the others the pinned map holds (at
        start, the cluster DNS addresses the last run served, until the first sync names them again)."""
        wanted = {}
        for host, port in addresses:
            if not ipaddress.ip_address(host).is_unspecified:
                key = structs.DnsListenKey(addr=structs.pack_addr(host), port=structs.net_port(port))
                wanted[bytes(key)] = bytes(ctypes.c_uint32(1))
        reconcile_map(self.listen, wanted, prune)

    def attach(self, interfaces: dict[str, int]) -> list[str]:
        """The program on the ingress of exactly these interfaces {name: ifindex}; what changed."""
        links = f"{self.bpffs}/{LINKS_DIR}"
        wanted = {f"{LINK_PREFIX}{name}-{index}": index for name, index in interfaces.items()}
        # a pin names its interface, but one this object did not attach may hold an earlier run's program:
        # not known, so updated in place once
        present = [pin for pin in os.listdir(links) if pin.startswith(LINK_PREFIX)]
        held = held_by_name((pin for pin in present if pin in self._linked), wanted)
        held.update((pin, None) for pin in present if pin not in self._linked)
        changed: list[str] = []

        def attach(pin: str, index: int) -> None:
            changed.append(f"{attach_tcx_pinned(self.program, index, BPF_TCX_INGRESS, f'{links}/{pin}')} {pin}")
            self._linked.add(pin)

        def detach(pin: str) -> None:
            os.unlink(f"{links}/{pin}")
            self._linked.discard(pin)
            changed.append(f"detached {pin}")

        reconcile(held, dict(sorted(wanted.items())), attach, detach)
        return changed

    def sync(self, records: dict[ServiceKey, dict[tuple[str, int], list[str]]], ttl: int) -> int:
        """Make noded_dns hold exactly these records, by service (those the program can answer); the map
        writes made. Entries an earlier run left that no service names any more are deleted."""
        by_service = {service: self._entries(named, ttl) for service, named in records.items()}
        wanted = {raw: val for entries in by_service.values() for raw, val in entries.items()}
        held = dict.fromkeys(bytes(k) for k in self.records.keys())  # noqa: SIM118 (a map, not a dict)
        writes = len(reconcile(held, wanted, self._write_record, self._delete_record))
        self._held = {service: tuple(entries) for service, entries in by_service.items() if entries}
        self.writes += writes
        return writes

    def update(self, records: dict[ServiceKey, dict[tuple[str, int], list[str]]], ttl: int) -> int:
        """Replace the records of just these services (one with none: its entries deleted); map writes made.
        What each service's entries hold is not kept (memory), so every wanted one is written again."""
        writes = 0
        for service, named in records.items():
            wanted = self._entries(named, ttl)
            old = dict.fromkeys(self._held.pop(service, ()))
            writes += len(reconcile(old, wanted, self._write_record, self._delete_record))
            if wanted:
                self._held[service] = tuple(wanted)
        self.writes += writes
        return writes

    @staticmethod
    def _entries(named: dict[tuple[str, int], list[str]], ttl: int) -> dict[bytes, structs.DnsVal]:
        """One service's entries the program can answer: {packed key: value}."""
        out = {}
        for (name, qtype), addresses in named.items():
            key, val = record_key(name, qtype), record_value(addresses, ttl)
            if key is not None and val is not None:
                out[bytes(key)] = val
        return out

    def _write_record(self, raw: bytes, val: structs.DnsVal) -> None:
        self.records.update(structs.DnsKey.from_buffer_copy(raw), val)

    def _delete_record(self, raw: bytes) -> None:
        self.records.delete(structs.DnsKey.from_buffer_copy(raw))

    def learned(self, reply: bytes, stored: float, expires: float) -> bool:
        """Put an answer the resolver learned upstream into the in-kernel cache (its reply to a plain query,
        stored and expires in CLOCK_MONOTONIC seconds); whether the program can serve it."""
        entry = cached_entry(reply, stored, expires)
        if entry is None:
            return False
        self.cache.update(*entry)
        self.cached += 1
        return True

    def stats(self) -> dict[str, int]:
        out = {}
        for name, index in STATS.items():
            per_cpu = self.stats_map.lookup(ctypes.c_uint32(index))
            out[name] = sum(per_cpu) if per_cpu is not None else 0
        return {**out, "records": sum(len(keys) for keys in self._held.values())}

    def close(self) -> None:
        for m in (self.records, self.cache, self.listen, self.stats_map):
            m.close()
        self.obj.close()
