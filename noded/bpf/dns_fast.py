"""The DNS fast path's kernel side: loads bpf/dns.c, pins its maps and tcx links, fills noded_dns.

`sync(records)` writes the difference between what the map holds and the zone's A/AAAA answers
(ClusterZone.address_records); names longer than the program reads or with more addresses than it
answers are left out, so userspace answers them. Links are pinned as `links/dns-<ifname>-<ifindex>`.
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

log = structlog.get_logger("noded.bpf.dns")
OBJECT = "dns.o"
LINK_PREFIX = "dns-"
A, AAAA = 1, 28


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
        self.listen = Map.open_pinned(f"{bpffs}/noded_dns_listen", structs.DnsListenKey, ctypes.c_uint32)
        self.stats_map = Map.open_pinned(
            f"{bpffs}/noded_dns_stats", ctypes.c_uint32, ctypes.c_uint64 * _possible_cpus()
        )
        self._held: dict[bytes, bytes] | None = None  # key bytes -> value bytes, as written
        self.writes = 0

    def set_listen(self, addresses: list[tuple[str, int]], prune: bool = True) -> None:
        """The addresses the fast path answers for; prune=False keeps the others the pinned map holds (at
        start, the cluster DNS addresses the last run served, until the first sync names them again)."""
        wanted = {}
        for host, port in addresses:
            ip = ipaddress.ip_address(host)
            if ip.version == 4 and not ip.is_unspecified:
                key = structs.DnsListenKey(port=structs.net_port(port))
                ctypes.memmove(key.addr, ip.packed, 4)
                wanted[bytes(key)] = key
        for key in list(self.listen.keys()) if prune else ():
            if bytes(key) not in wanted:
                self.listen.delete(key)
        for key in wanted.values():
            self.listen.update(key, ctypes.c_uint32(1))

    def attach(self, interfaces: dict[str, int]) -> list[str]:
        """The program on the ingress of exactly these interfaces {name: ifindex}; what changed."""
        links = f"{self.bpffs}/{LINKS_DIR}"
        wanted = {f"{LINK_PREFIX}{name}-{index}": index for name, index in interfaces.items()}
        changed = []
        for pin in os.listdir(links):
            if pin.startswith(LINK_PREFIX) and pin not in wanted:
                os.unlink(f"{links}/{pin}")
                changed.append(f"detached {pin}")
        for pin, index in sorted(wanted.items()):
            if not os.path.exists(f"{links}/{pin}"):
                changed.append(f"{attach_tcx_pinned(self.program, index, BPF_TCX_INGRESS, f'{links}/{pin}')} {pin}")
        return changed

    def sync(self, records: dict[tuple[str, int], list[str]], ttl: int) -> int:
        """Make noded_dns hold exactly these records (those the program can answer); map writes made."""
        if self._held is None:  # first sync after a start: what an earlier run left
            self._held = {bytes(k): bytes(v) for k, v in self.records.items()}
        wanted: dict[bytes, tuple[structs.DnsKey, structs.DnsVal]] = {}
        for (name, qtype), addresses in records.items():
            key, val = record_key(name, qtype), record_value(addresses, ttl)
            if key is not None and val is not None:
                wanted[bytes(key)] = (key, val)
        writes = 0
        for raw in [k for k in self._held if k not in wanted]:
            self.records.delete(structs.DnsKey.from_buffer_copy(raw))
            del self._held[raw]
            writes += 1
        for raw, (key, val) in wanted.items():
            if self._held.get(raw) != bytes(val):
                self.records.update(key, val)
                self._held[raw] = bytes(val)
                writes += 1
        self.writes += writes
        return writes

    def stats(self) -> dict[str, int]:
        out = {}
        for index, name in ((0, "answered"), (1, "passed")):
            per_cpu = self.stats_map.lookup(ctypes.c_uint32(index))
            out[name] = sum(per_cpu) if per_cpu is not None else 0
        return {**out, "records": len(self._held or {})}

    def close(self) -> None:
        for m in (self.records, self.listen, self.stats_map):
            m.close()
        self.obj.close()
