"""eBPF proxier: turns desired frontends into socket-LB map entries, touching only what changed.

Mirrors what it programmed; after a restart it reads the pinned maps back, so
the first sync rewrites nothing that is already right. A sync's writes are applied
together, in phases and batches (MapWrites).
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog

from noded.bpf import structs
from noded.bpf.nat_gc import NatCollector
from noded.bpf.sock_lb import LbMaps, attach_external, cgroup_links, external_links_missing, repair
from noded.bpf.sock_term import Removed, SocketTerminator
from noded.model.tracker import Backend, Frontend, FrontendState, ServiceKey, ServiceModel
from noded.reconcile import reconcile, reconcile_map
from noded.services.slots import plan_slots
from noded.services.view import ProgrammedView

log = structlog.get_logger("noded.services.ebpf")

SOCKET_LB_PROTOCOLS = ("TCP", "UDP")


@dataclass
class Programmed:
    """One frontend as it stands in the maps."""

    svc_id: int
    affinity_timeout: int = 0
    ready: list[int] = field(default_factory=list)  # backend ids, slot order
    terminating: list[int] = field(default_factory=list)
    # -> its backend id, negated when it is serving-terminating (an int, not a pair: 100,000 tuples were 5 MiB)
    backends: dict[Backend, int] = field(default_factory=dict)
    flags: int = 0  # structs.SVC_*


SVC_KEY, SVC_VAL, BACKEND, BACKEND_ID = (
    structs.packer(structs.SvcKey),
    structs.packer(structs.SvcVal),
    structs.packer(structs.Backend),
    struct.Struct("=I"),
)


def _packed_svc_key(fe: Frontend, slot: int, addr: bytes) -> bytes:
    """The map key of a frontend's slot (0: its master), as bytes; `addr` its address packed already."""
    return SVC_KEY.pack(addr, structs.net_port(fe.port), structs.IPPROTO[fe.protocol], fe.scope, slot, 0)


def map_frontends(frontends: dict[Frontend, FrontendState]) -> dict[Frontend, FrontendState]:
    """The map entries a service's frontends need: each for this node's sockets (in-cluster backends),
    and external frontends once more for packets arriving from outside (tc, external policy)."""
    out: dict[Frontend, FrontendState] = {}
    for fe, st in frontends.items():
        if fe.protocol not in SOCKET_LB_PROTOCOLS:
            continue
        out[fe] = replace(st, ready=st.in_cluster[0], terminating=st.in_cluster[1]) if st.in_cluster else st
        if st.external:
            out[replace(fe, scope=structs.SCOPE_EXTERNAL)] = st
    return out


def plan_frontend(
    cur: Programmed | None, state: FrontendState, new_svc_id: Callable[[], int], new_backend_id: Callable[[], int]
) -> Programmed:
    """The plan step: a frontend as it should stand in the maps, from how it stands (None: not yet). Ids are
    kept (a backend's too when only its terminating flag changes); slots move as few as they can."""
    backends: dict[Backend, int] = {}
    held = cur.backends if cur is not None else {}
    for terminating, members in ((False, state.ready), (True, state.terminating)):
        for be in members:
            old = held.get(be)
            bid = abs(old) if old is not None else new_backend_id()
            backends[be] = -bid if terminating else bid
    new = Programmed(cur.svc_id if cur is not None else new_svc_id(), state.service.affinity_timeout)
    new.ready = plan_slots(cur.ready if cur else [], [backends[b] for b in state.ready])
    new.terminating = plan_slots(cur.terminating if cur else [], [-backends[b] for b in state.terminating])
    new.backends = backends
    # no endpoint anywhere, for anyone: refused (a Local-policy frontend with only remote ones drops)
    new.flags = 0 if state.serving else structs.SVC_NO_ENDPOINTS
    return new


def frontend_tables(p: Programmed | None) -> tuple[dict, dict, dict]:
    """A frontend's entries as the reconciler's tables: {backend id: (backend, terminating)}, {slot: backend
    id}, {0: its master's (ready, terminating, affinity timeout, flags)}; none for None."""
    if p is None:
        return {}, {}, {}
    return (
        {abs(code): (be, code < 0) for be, code in p.backends.items()},
        dict(enumerate(p.ready + p.terminating, 1)),
        {0: (len(p.ready), len(p.terminating), p.affinity_timeout, p.flags)},
    )


def read_maps(maps: LbMaps) -> tuple[dict[Frontend, Programmed], int, int]:
    """Everything programmed, with the highest service and backend ids in use."""
    masters: dict[Frontend, structs.SvcVal] = {}
    slots: dict[Frontend, dict[int, int]] = {}
    for key, val in maps.svc.items():
        fe = Frontend(
            structs.unpack_addr(key.addr),
            structs.host_port(key.port),
            structs.PROTO_NAME.get(key.proto, "?"),
            key.scope,
        )
        if key.slot == 0:
            masters[fe] = val
        else:
            slots.setdefault(fe, {})[key.slot] = val.backend_id
    backends = {int(k.value): v for k, v in maps.backends.items()}
    out: dict[Frontend, Programmed] = {}
    for fe, master in masters.items():
        fe_slots = slots.get(fe, {})
        ids = [fe_slots.get(i) for i in range(1, master.ready + master.terminating + 1)]
        p = Programmed(master.svc_id, master.affinity_timeout)
        p.ready = [i for i in ids[: master.ready] if i is not None]
        p.terminating = [i for i in ids[master.ready :] if i is not None]
        for bid in p.ready + p.terminating:
            be = backends.get(bid)
            if be is not None:
                addr = (structs.unpack_addr(be.addr), structs.host_port(be.port))
                p.backends[addr] = -bid if be.flags & structs.BACKEND_TERMINATING else bid
        out[fe] = p
    max_svc = max((m.svc_id for m in masters.values()), default=0)
    return out, max_svc, max(backends, default=0)


def describe(maps: LbMaps) -> list[ProgrammedView]:
    """One view per frontend; where a frontend also has an entry for external packets, that one (what
    external clients get), as the nftables view shows it."""
    programmed, _, _ = read_maps(maps)
    external = {replace(fe, scope=0): (fe, p) for fe, p in programmed.items() if fe.scope == structs.SCOPE_EXTERNAL}
    chosen = {fe: external.get(fe, (fe, p))[1] for fe, p in programmed.items() if fe.scope == structs.SCOPE_SOCKET}
    chosen.update({fe: p for fe, (_x, p) in external.items() if fe not in chosen})
    views = []
    for fe, p in sorted(chosen.items(), key=lambda kv: (kv[0].ip, kv[0].port, kv[0].protocol)):
        by_id = {abs(code): addr for addr, code in p.backends.items()}
        views.append(
            ProgrammedView(
                fe,
                p.svc_id,
                p.affinity_timeout,
                [by_id[i] for i in p.ready if i in by_id],
                [by_id[i] for i in p.terminating if i in by_id],
            )
        )
    return views


class MapWrites:
    """The map writes of one sync, applied in phases with a syscall per BATCH entries instead of one per
    entry: every backend, then every slot, then every master, then the deletes that shrink. The order the
    datapath relies on holds across the whole sync: a slot never names a backend not yet written, a master
    never counts a slot not yet written, and nothing is deleted while a master may still count it."""

    BATCH = 4096
    PHASES = ("backends", "slots", "masters")

    def __init__(self) -> None:
        # phase -> id(map) -> [map, packed keys, packed values, count]: one buffer per map, not an object per
        # write (200,000 small bytes objects left the daemon's arenas fragmented after a first sync)
        self.updates: dict[str, dict[int, list]] = {p: {} for p in self.PHASES}
        self.deletes: list[tuple[object, bytes]] = []

    def update(self, phase: str, m, key: bytes, value: bytes) -> None:
        by_map = self.updates[phase]
        pending = by_map.get(id(m))
        if pending is None:
            pending = by_map[id(m)] = [m, bytearray(), bytearray(), 0]
        pending[1] += key
        pending[2] += value
        pending[3] += 1

    def delete(self, m, key: bytes) -> None:
        self.deletes.append((m, key))

    def apply(self) -> None:
        for phase in self.PHASES:
            for m, keys, values, count in self.updates[phase].values():
                ksize, vsize = len(keys) // count, len(values) // count
                with memoryview(keys) as k, memoryview(values) as v:
                    for i in range(0, count, self.BATCH):
                        n = min(self.BATCH, count - i)
                        m.update_raw(k[i * ksize : (i + n) * ksize], v[i * vsize : (i + n) * vsize], n)
            self.updates[phase] = {}
        run: list[bytes] = []
        for i, (m, key) in enumerate(self.deletes):  # consecutive deletes from one map: one syscall
            run.append(key)
            nxt = self.deletes[i + 1][0] if i + 1 < len(self.deletes) else None
            if nxt is not m or len(run) == self.BATCH:
                m.delete_raw(b"".join(run), len(run))
                run = []
        self.deletes = []


class EbpfProxier:
    """Programs the socket-LB maps from the model, one changed service at a time."""

    name = "ebpf"

    def __init__(
        self,
        model: ServiceModel,
        maps: LbMaps,
        bpffs: str | None = None,
        cluster_cidrs: list[str] | tuple = (),
        cgroup_path: str | None = None,
        terminator: SocketTerminator | None = None,
        collector: NatCollector | None = None,
    ) -> None:
        self.model = model
        self.tracker = model.frontend_changes()  # this proxier's own change tracker
        self.terminator = terminator
        self.collector = collector
        self._removed: list[Removed] = []  # backends left by their frontend in this sync
        self.maps = maps
        self.bpffs = bpffs
        self.cgroup_path = cgroup_path
        self.expected_links = cgroup_links(bpffs) if bpffs else []  # what repair() puts back if removed
        self.external_interfaces: dict[str, int] | None = None
        self._set_cluster_cidrs(list(cluster_cidrs))
        programmed, max_svc, max_backend = read_maps(maps)
        # Adopted at the first full sync; whatever no service claims then is stale.
        self._unclaimed: dict[Frontend, Programmed] = programmed
        self._by_service: dict[ServiceKey, dict[Frontend, Programmed]] = {}
        self._owner: dict[Frontend, ServiceKey] = {}
        self._next_svc_id = max_svc + 1
        self._next_backend_id = max_backend + 1
        self.map_writes = 0
        self._writes = MapWrites()
        if programmed:
            log.info("recovered programmed frontends from pinned maps", frontends=len(programmed))
        for key in list(maps.mesh_netns.keys()):  # the capture registers the mesh pods' anew as it reopens them
            maps.mesh_netns.delete(key)

    def set_mesh_netns(self, cookie: int, mesh: bool) -> None:
        """A mesh pod's netns: its TCP connects keep their VIP for the capture (see noded_maps.h)."""
        key = ctypes.c_uint64(cookie)
        if mesh:
            self.maps.mesh_netns.update(key, ctypes.c_uint32(1))
        else:
            self.maps.mesh_netns.delete(key)

    # -- the sync -------------------------------------------------------------
    def sync(self, full: bool = False) -> int:
        """Apply the model's pending changes (all services when full); returns services synced."""
        if full:
            if self.bpffs and self.cgroup_path:
                for what in repair(self.bpffs, self.cgroup_path, self.maps, self.expected_links):
                    log.warning("removed behind noded's back; repaired", what=what)
            changed = self.tracker.take_all(self.model.service_keys) | set(self._by_service)
        else:
            changed = self.tracker.take()
        try:
            self._apply(changed, full)
        except Exception:
            self._believe_the_maps()
            raise
        return len(changed)

    def _believe_the_maps(self) -> None:
        """After a failed sync what noded believes it programmed may not be what the maps hold (a write that
        never happened, a batch cut short): forget it and adopt the maps as they are, so the full sync the
        runner retries with compares against the kernel, rewriting exactly what is missing or wrong."""
        programmed, max_svc, max_backend = read_maps(self.maps)
        referenced = {abs(code) for p in programmed.values() for code in p.backends.values()}
        for key in list(self.maps.backends.keys()):  # written, then the slot naming it never was
            if int(key.value) not in referenced:
                self.maps.backends.delete(key)
        self._unclaimed = programmed
        self._by_service = {}
        self._owner = {}
        self._next_svc_id = max(self._next_svc_id, max_svc + 1)  # ids are never reused
        self._next_backend_id = max(self._next_backend_id, max_backend + 1)
        self._writes = MapWrites()
        self._removed = []

    def _apply(self, changed: set[ServiceKey], full: bool) -> None:
        desired = {key: self._socket_lb_frontends(key) for key in changed}
        # Removals first, so a VIP that moves between services in one batch is free to take.
        for key in changed:
            for fe in set(self._by_service.get(key, {})) - set(desired[key]):
                self._remove_frontend(key, fe)
        try:
            for key, frontends in desired.items():
                for fe, state in frontends.items():
                    self._program_frontend(key, fe, state)
                if not self._by_service.get(key):
                    self._by_service.pop(key, None)
        finally:
            self._writes.apply()
        if full and self._unclaimed:
            for fe, p in list(self._unclaimed.items()):
                log.info("removing stale frontend", frontend=str(fe))
                self._delete_programmed(fe, p)
            self._unclaimed.clear()
        removed, self._removed = self._removed, []
        if self.terminator is not None and removed:
            self.terminator.terminate(removed)
        if full and self.collector is not None:  # NodePort flows that expired give their room back
            self.collector.collect()

    def extras(self) -> dict[str, object]:
        """For `noded status`: socket termination (or why it is off) and the NodePort flow table."""
        return {
            "socketTermination": self.terminator.describe()
            if self.terminator is not None
            else {"enabled": False, "reason": "services.socketTermination is false"},
            "nodePortFlows": self.collector.describe() if self.collector is not None else None,
        }

    def _socket_lb_frontends(self, key: ServiceKey) -> dict[Frontend, FrontendState]:
        return map_frontends(self.model.frontends_of(key))

    def set_external_interfaces(self, interfaces: dict[str, int]) -> None:
        """Where packets from outside arrive (the interfaces holding node port addresses): the tc programs
        are attached there and detached everywhere else."""
        if self.bpffs is None:
            return
        if interfaces == self.external_interfaces and not external_links_missing(self.bpffs, interfaces):
            return

        for what in attach_external(self.bpffs, interfaces):
            log.info("external interface program", change=what)
        self.external_interfaces = dict(interfaces)

    def _set_cluster_cidrs(self, cidrs: list[str]) -> None:
        """Sources the tc programs treat as pods (the cluster CIDRs; IPv4 ones mapped, as addresses are)."""
        wanted = {}
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            key = structs.CidrKey(prefixlen=net.prefixlen + (96 if net.version == 4 else 0))
            key.addr = structs.pack_addr(str(net.network_address))
            wanted[bytes(key)] = bytes(ctypes.c_uint32(1))
        reconcile_map(self.maps.cluster_cidrs, wanted)

    # -- one frontend -----------------------------------------------------------
    def _program_frontend(self, key: ServiceKey, fe: Frontend, state: FrontendState) -> None:
        owner = self._owner.get(fe)
        if owner is not None and owner != key:
            log.error(
                "frontend claimed by two services",
                frontend=str(fe),
                kept=f"{owner[0]}/{owner[1]}",
                ignored=f"{key[0]}/{key[1]}",
            )
            return
        services = self._by_service.setdefault(key, {})
        cur = services.get(fe) or self._unclaimed.pop(fe, None)
        new = plan_frontend(cur, state, self._alloc_svc_id, self._alloc_backend_id)
        self._reconcile_frontend(fe, cur, new, self._write_later, self._delete_later)
        services[fe] = new
        self._owner[fe] = key

    def _reconcile_frontend(self, fe: Frontend, cur: Programmed | None, new: Programmed | None, write, delete) -> None:
        """Bring a frontend's entries from `cur` to `new` (None: none) through the one reconciler, table by
        table: slots, backends, then its master (a removal: its master first). `write`/`delete` queue (a sync)
        or apply (a removal)."""
        held, wanted = frontend_tables(cur), frontend_tables(new)
        svc_id = new.svc_id if new is not None else cur.svc_id if cur is not None else 0
        addr = structs.addr_bytes(fe.ip)
        backends, svc = self.maps.backends, self.maps.svc

        def write_backend(bid: int, value: tuple[Backend, bool]) -> None:
            self._write_backend(bid, value[0], fe.protocol, value[1])

        def delete_backend(bid: int) -> None:
            delete(backends, BACKEND_ID.pack(bid))
            self._backend_left(fe, svc_id, held[0][bid][0])

        def write_slot(slot: int, bid: int) -> None:
            write("slots", svc, _packed_svc_key(fe, slot, addr), SVC_VAL.pack(bid, svc_id, 0, 0, 0, 0))

        def write_master(slot: int, value: tuple[int, int, int, int]) -> None:
            write("masters", svc, _packed_svc_key(fe, slot, addr), SVC_VAL.pack(0, svc_id, *value))

        def delete_slot(slot: int) -> None:  # slot 0: the master (the VIP stops translating)
            delete(svc, _packed_svc_key(fe, slot, addr))

        if new is None:  # removed: the master goes first, then what it counted
            reconcile(held[2], {}, write_master, delete_slot)
        reconcile(held[1], wanted[1], write_slot, delete_slot)
        reconcile(held[0], wanted[0], write_backend, delete_backend)
        if new is not None:
            reconcile(held[2], wanted[2], write_master, delete_slot)

    def _remove_frontend(self, key: ServiceKey, fe: Frontend) -> None:
        p = self._by_service[key].pop(fe)
        self._owner.pop(fe, None)
        self._delete_programmed(fe, p)

    def _delete_programmed(self, fe: Frontend, p: Programmed) -> None:
        self._reconcile_frontend(fe, p, None, self._write_later, self._delete)

    def _backend_left(self, fe: Frontend, svc_id: int, be: Backend) -> None:
        if fe.scope == structs.SCOPE_SOCKET:  # only the socket hooks connect sockets to a backend
            self._removed.append((svc_id, be[0], be[1], fe.protocol))

    # -- map writes -------------------------------------------------------------
    def _write_backend(self, bid: int, be: Backend, protocol: str, terminating: bool) -> None:
        flags = structs.BACKEND_TERMINATING if terminating else 0
        value = BACKEND.pack(structs.addr_bytes(be[0]), structs.net_port(be[1]), structs.IPPROTO[protocol], flags)
        self._write_later("backends", self.maps.backends, BACKEND_ID.pack(bid), value)

    def _write_later(self, phase: str, m, key: bytes, value: bytes) -> None:
        """A write applied with the sync's others (MapWrites: in phases, batched)."""
        self._writes.update(phase, m, key, value)
        self.map_writes += 1

    def _delete_later(self, m, key: bytes) -> None:
        self._writes.delete(m, key)
        self.map_writes += 1

    def _delete(self, m, key) -> None:
        m.delete(key)
        self.map_writes += 1

    def _alloc_svc_id(self) -> int:
        # Ids are never reused: a stale affinity entry can never point into another service.
        self._next_svc_id += 1
        return self._next_svc_id - 1

    def _alloc_backend_id(self) -> int:
        self._next_backend_id += 1
        return self._next_backend_id - 1
