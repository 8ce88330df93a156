"""Socket termination: destroys sockets the socket-LB connected to a backend that left its service.

The eBPF socket-LB rewrites a connected socket's destination once, at connect(); when that backend stops
being an endpoint, nothing else would ever move the socket (a connected UDP client would keep sending into
the void). After a sync, the proxier hands the removed (service id, backend) pairs here: they go into the
`noded_sock_term` map, and the iterators of `bpf/sock_term.c` run once in every network namespace that has
a process in noded's cgroup, destroying with `bpf_sock_destroy()` the sockets translated for exactly those
pairs (Cilium's answer to the same problem, on kernels >= 6.5). UDP always; TCP when asked
(`services.terminateTCPConnections`, Cilium's "terminate pod connections").

Where the kernel lacks the kfunc or the iterators, `available` is False and `reason` says why: the
proxier goes on without this protection and `noded status` shows it off.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import structlog

from noded.bpf import structs
from noded.bpf.libbpf import BpfError, IterLink, Map, Object
from noded.kernel.podns import CaptureError, entered

log = structlog.get_logger("noded.bpf.sock_term")

OBJECT_NAME = "sock_term.o"
MAP_NAME = "noded_sock_term"
MAP_SIZE = 65536  # NODED_SOCK_TERM_MAP_SIZE

# (svc_id, backend address, backend port, "TCP"|"UDP")
Removed = tuple[int, str, int, str]


@dataclass
class TermStats:
    runs: int = 0
    destroyed: int = 0
    namespaces: int = 0  # visited in the last run
    last_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the last few


def cgroup_namespaces(cgroup_path: str) -> list[str]:
    """One /proc/PID/ns/net path per network namespace with a process in the cgroup tree, this process's
    own first (found by the namespace's inode, so each is visited once)."""
    seen: set[tuple[int, int]] = set()
    out: list[str] = []

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return  # the process is gone
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(path)

    add("/proc/thread-self/ns/net")
    for pid in _cgroup_pids(cgroup_path):
        add(f"/proc/{pid}/ns/net")
    return out


def _cgroup_pids(cgroup_path: str) -> Iterator[int]:
    for dirpath, _dirs, _files in os.walk(cgroup_path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                yield from (int(line) for line in f if line.strip())
        except OSError:
            continue  # removed meanwhile


class SocketTerminator:
    """Loads the iterators once; `terminate()` after each sync that removed backends."""

    def __init__(self, bpffs: str, cgroup_path: str, tcp: bool = False) -> None:
        self.cgroup_path = cgroup_path
        self.tcp = tcp
        self.stats = TermStats()
        self.available = False
        self.reason = ""
        self._links: list[IterLink] = []
        self._map: Map | None = None
        try:
            self._load(bpffs)
            self.available = True
        except (BpfError, OSError) as e:
            self.reason = f"kernel without socket iterators or bpf_sock_destroy: {e}"
            log.warning("socket termination is off", reason=self.reason)
            self.close()

    def _load(self, bpffs: str) -> None:
        from noded.bpf.sock_lb import object_path

        obj = Object(object_path(OBJECT_NAME))
        try:
            obj.pin_maps_under(bpffs)
            obj.load()
            for name, _section, prog in obj.programs():
                if name == "noded_term_udp" or (self.tcp and name == "noded_term_tcp"):
                    self._links.append(IterLink(prog, name))
            self._map = Map(obj.map_fd(MAP_NAME), structs.TermKey, ctypes.c_uint32, MAP_NAME)
        finally:
            obj.close()

    def describe(self) -> dict:
        return {
            "enabled": self.available,
            "reason": self.reason,
            "protocols": (["UDP", "TCP"] if self.tcp else ["UDP"]) if self.available else [],
            "runs": self.stats.runs,
            "destroyed": self.stats.destroyed,
            "namespaces": self.stats.namespaces,
            "lastSeconds": round(self.stats.last_seconds, 4),
            "errors": self.stats.errors[-5:],
        }

    def terminate(self, removed: Iterable[Removed]) -> int:
        """Destroy the sockets translated to these removed backends; returns how many were destroyed."""
        wanted = [r for r in removed if r[3] == "UDP" or (self.tcp and r[3] == "TCP")]
        if not self.available or not wanted or self._map is None:
            return 0
        start = time.perf_counter()
        destroyed = 0
        namespaces = cgroup_namespaces(self.cgroup_path)
        for first in range(0, len(wanted), MAP_SIZE):
            keys = [_term_key(*r) for r in wanted[first : first + MAP_SIZE]]
            for key in keys:
                self._map.update(key, ctypes.c_uint32(0))
            try:
                for ns in namespaces:
                    self._run_in(ns)
            finally:
                for key in keys:
                    count = self._map.lookup(key)
                    destroyed += int(count.value) if count is not None else 0
                    self._map.delete(key)
        self.stats.runs += 1
        self.stats.destroyed += destroyed
        self.stats.namespaces = len(namespaces)
        self.stats.last_seconds = time.perf_counter() - start
        if destroyed:
            log.info("sockets to removed backends destroyed", sockets=destroyed, backends=len(wanted))
        return destroyed

    def _run_in(self, netns_path: str) -> None:
        try:
            with entered(netns_path):
                for link in self._links:
                    link.run()
        except (CaptureError, BpfError, OSError) as e:
            if isinstance(e, CaptureError) and "No such file" in str(e):
                return  # the process left between listing and entering
            self.stats.errors = [*self.stats.errors[-4:], str(e)]
            log.warning("socket termination failed in a namespace", netns=netns_path, error=str(e))

    def close(self) -> None:
        for link in self._links:
            link.close()
        self._links = []
        if self._map is not None:
            self._map.close()
            self._map = None


def _term_key(svc_id: int, addr: str, port: int, protocol: str) -> structs.TermKey:
    return structs.TermKey(
        addr=structs.pack_addr(addr), port=structs.net_port(port), proto=structs.IPPROTO[protocol], svc_id=svc_id
    )
