"""Loads the socket-LB and NodePort objects, pins their maps and links under the instance's bpffs path,
removes them."""

from __future__ import annotations

import ctypes
import os
import subprocess
from dataclasses import dataclass
from importlib import resources

import structlog

from noded.bpf import structs
from noded.bpf.libbpf import (
    BPF_TCX_EGRESS,
    BPF_TCX_INGRESS,
    BpfError,
    Map,
    Object,
    attach_cgroup_pinned,
    attach_tcx_pinned,
)
from noded.reconcile import changes

log = structlog.get_logger("noded.bpf")

OBJECT_NAME = "sock_lb.o"
NODEPORT_OBJECT = "nodeport.o"
LINKS_DIR = "links"
TC_LINK_PREFIX = "tc-"


def object_path(name: str = OBJECT_NAME) -> str:
    path = resources.files("noded.bpf").joinpath("obj", name)
    if not path.is_file():
        raise BpfError(2, f"{path} is missing: run `make bpf`")
    return str(path)


def ensure_bpffs(path: str) -> None:
    """Mount bpffs at /sys/fs/bpf when nothing is mounted there (as Cilium does)."""
    root = "/sys/fs/bpf"
    if path.startswith(root + "/") and not _is_bpffs(root):
        subprocess.run(["mount", "-t", "bpf", "bpf", root], check=True)
    os.makedirs(path, exist_ok=True)


def _is_bpffs(path: str) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == path and line.split()[2] == "bpf" for line in mounts)


MAP_SPECS = {  # field: (pin name, key type, value type)
    "svc": ("noded_svc", structs.SvcKey, structs.SvcVal),
    "backends": ("noded_backends", ctypes.c_uint32, structs.Backend),
    "revnat": ("noded_revnat", structs.RevNatKey, structs.RevNatVal),
    "affinity": ("noded_affinity", structs.AffinityKey, structs.AffinityVal),
    "nat": ("noded_nat", structs.NatKey, structs.NatVal),
    "cluster_cidrs": ("noded_cluster_cidrs", structs.CidrKey, ctypes.c_uint32),
    "mesh_netns": ("noded_mesh_netns", ctypes.c_uint64, ctypes.c_uint32),
}


@dataclass
class LbMaps:
    svc: Map[structs.SvcKey, structs.SvcVal]
    backends: Map
    revnat: Map[structs.RevNatKey, structs.RevNatVal]
    affinity: Map[structs.AffinityKey, structs.AffinityVal]
    nat: Map[structs.NatKey, structs.NatVal]
    cluster_cidrs: Map[structs.CidrKey, ctypes.c_uint32]
    mesh_netns: Map[ctypes.c_uint64, ctypes.c_uint32]  # mesh pods' netns cookies: TCP left to their capture

    @classmethod
    def open_pinned(cls, bpffs: str) -> LbMaps:
        """The instance's pinned maps; on failure nothing stays open."""
        opened: dict[str, Map] = {}
        try:
            for field_name, (pin, key, value) in MAP_SPECS.items():
                opened[field_name] = Map.open_pinned(f"{bpffs}/{pin}", key, value)
        except BpfError:
            for m in opened.values():
                m.close()
            raise
        return cls(**opened)

    def close(self) -> None:
        for m in (self.svc, self.backends, self.revnat, self.affinity, self.nat, self.cluster_cidrs, self.mesh_netns):
            m.close()


def load_and_attach(bpffs: str, cgroup_path: str) -> LbMaps:
    """Load the programs (reusing pinned maps) and attach them to cgroup_path.

    Pinned links already there are switched to the new programs atomically, so a
    restart never leaves the hooks detached.
    """
    ensure_bpffs(bpffs)
    os.makedirs(f"{bpffs}/{LINKS_DIR}", exist_ok=True)
    obj = Object(object_path())
    try:
        obj.pin_maps_under(bpffs)
        obj.load()
        for name, section, prog in obj.programs():
            what = attach_cgroup_pinned(prog, cgroup_path, f"{bpffs}/{LINKS_DIR}/{name}")
            log.info("bpf program attached", program=name, section=section, cgroup=cgroup_path, how=what)
    finally:
        obj.close()
    # the NodePort object's maps too, so every map exists before anyone opens them
    nodeport = Object(object_path(NODEPORT_OBJECT))
    try:
        nodeport.pin_maps_under(bpffs)
        nodeport.load()
    finally:
        nodeport.close()
    return LbMaps.open_pinned(bpffs)


def cgroup_links(bpffs: str) -> list[str]:
    """The pinned links of the cgroup hooks (the socket-LB programs), by program name."""
    links = f"{bpffs}/{LINKS_DIR}"
    return sorted(p for p in os.listdir(links) if p.startswith("noded_")) if os.path.isdir(links) else []


def repair(bpffs: str, cgroup_path: str, maps: LbMaps, expected_links: list[str]) -> list[str]:
    """Put back what was removed behind noded's back (`rm` in bpffs): a map's pin from the map noded holds
    open, which its programs still use; a cgroup link by attaching again (links in place are only updated).
    Returns what was repaired."""
    repaired = []
    for field_name, (pin, _key, _value) in MAP_SPECS.items():
        if not os.path.exists(f"{bpffs}/{pin}"):
            getattr(maps, field_name).pin(f"{bpffs}/{pin}")
            repaired.append(f"re-pinned map {pin}")
    missing = [name for name in expected_links if not os.path.exists(f"{bpffs}/{LINKS_DIR}/{name}")]
    if missing:
        load_and_attach(bpffs, cgroup_path).close()
        repaired += [f"re-attached {name}" for name in missing]
    return repaired


def external_link_pins(interfaces: dict[str, int]) -> dict[str, tuple[int, int, str]]:
    """{pin name: (ifindex, attach type, program)} of the NodePort programs on interfaces {name: ifindex}."""
    return {
        f"{TC_LINK_PREFIX}{name}-{index}-{way}": (index, attach_type, f"noded_nodeport_{way}")
        for name, index in interfaces.items()
        for way, attach_type in (("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS))
    }


def external_links_missing(bpffs: str, interfaces: dict[str, int]) -> bool:
    return any(not os.path.exists(f"{bpffs}/{LINKS_DIR}/{pin}") for pin in external_link_pins(interfaces))


def attach_external(bpffs: str, interfaces: dict[str, int]) -> list[str]:
    """Attach the NodePort programs (ingress and egress) to interfaces {name: ifindex} with pinned tcx links,
    and detach them from every other interface. Returns what changed. A link already pinned is updated in
    place to this object's program (it may hold an earlier run's): held links count as not known."""
    links = f"{bpffs}/{LINKS_DIR}"
    held = dict.fromkeys(pin for pin in os.listdir(links) if pin.startswith(TC_LINK_PREFIX))
    todo = changes(held, dict(sorted(external_link_pins(interfaces).items())))
    changed = []
    for pin in todo.delete:
        os.unlink(f"{links}/{pin}")
        changed.append(f"detached {pin}")
    if not todo.write:
        return changed
    obj = Object(object_path(NODEPORT_OBJECT))
    try:
        obj.pin_maps_under(bpffs)
        obj.load()
        programs = {name: prog for name, _section, prog in obj.programs()}
        for pin, (index, attach_type, program) in todo.write.items():
            what = attach_tcx_pinned(programs[program], index, attach_type, f"{links}/{pin}")
            changed.append(f"{what} {pin}")
    finally:
        obj.close()
    return changed


def attached_programs(bpffs: str) -> list[str]:
    links = f"{bpffs}/{LINKS_DIR}"
    return sorted(os.listdir(links)) if os.path.isdir(links) else []


def remove(bpffs: str, spare: tuple[str, ...] = ()) -> list[str]:
    """Unpin every link (detaching its program) and map under bpffs but those whose name starts with one
    of `spare`; returns what was removed."""
    removed: list[str] = []
    if not os.path.isdir(bpffs):
        return removed
    for dirpath, _dirs, files in os.walk(bpffs, topdown=False):
        for name in files:
            if not name.startswith(spare):
                os.unlink(os.path.join(dirpath, name))
                removed.append(os.path.join(dirpath, name))
        if dirpath != bpffs and not os.listdir(dirpath):
            os.rmdir(dirpath)
    if os.listdir(bpffs):
        return removed
    os.rmdir(bpffs)
    parent = os.path.dirname(bpffs.rstrip("/"))
    if os.path.basename(parent) == "noded" and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)
    return removed
