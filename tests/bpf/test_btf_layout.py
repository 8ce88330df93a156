"""The Python mirrors of the map structs match the compiled object's BTF, field by field."""

import ctypes
import json
import os
import subprocess

import pytest

from noded.bpf import libbpf, sock_lb, structs
from noded.services import ebpf
from tests.objects import endpoint, service, slice_


def btf_structs(obj=sock_lb.OBJECT_NAME):
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", sock_lb.object_path(obj)], capture_output=True, text=True, check=True
    )
    return {t["name"]: t for t in json.loads(out.stdout)["types"] if t.get("kind") == "STRUCT"}


@pytest.mark.parametrize(("obj", "mirrors"), [("sock_lb.o", structs.MIRRORS), ("dns.o", structs.DNS_MIRRORS)])
def test_every_mirror_matches_btf(obj, mirrors):
    btf = btf_structs(obj)
    assert set(mirrors) <= set(btf), "a mirrored struct is missing from the object's BTF"
    for name, mirror in mirrors.items():
        t = btf[name]
        assert ctypes.sizeof(mirror) == t["size"], name
        btf_fields = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
        py_fields = [(f, getattr(mirror, f).offset) for f, *_ in mirror._fields_]
        assert py_fields == btf_fields, name


@pytest.mark.parametrize(
    ("obj", "mirrors"),
    [("sock_lb.o", structs.ENUM_MIRRORS), ("nodeport.o", structs.ENUM_MIRRORS), ("dns.o", structs.DNS_ENUM_MIRRORS)],
)
def test_every_enum_mirror_matches_btf_member_for_member(obj, mirrors):
    """The flags and kinds the programs and noded share: a value changed, added or dropped on either side fails."""
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", sock_lb.object_path(obj)], capture_output=True, text=True, check=True
    )
    enums = {t["name"]: t for t in json.loads(out.stdout)["types"] if t.get("kind") == "ENUM"}
    for name, members in mirrors.items():
        assert name in enums, f"{name} is not in {obj}'s BTF (is a field or map key still typed by it?)"
        assert {m["name"]: m["val"] for m in enums[name]["values"]} == members, name


def test_map_value_sizes_match_the_maps_libbpf_creates(ebpf_lb):
    lb = ebpf_lb
    for m, key, value in (
        (lb.maps.svc, structs.SvcKey, structs.SvcVal),
        (lb.maps.backends, ctypes.c_uint32, structs.Backend),
        (lb.maps.revnat, structs.RevNatKey, structs.RevNatVal),
        (lb.maps.affinity, structs.AffinityKey, structs.AffinityVal),
    ):
        info = json.loads(
            subprocess.run(
                ["bpftool", "-j", "map", "show", "pinned", f"{lb.bpffs}/{m.name}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert (info["bytes_key"], info["bytes_value"]) == (ctypes.sizeof(key), ctypes.sizeof(value)), m.name


def test_a_pinned_map_left_with_an_older_layout_is_replaced_and_the_rest_kept(ebpf_lb):
    lb = ebpf_lb
    lb.apply(service("keep", "10.96.40.1"), slice_("keep", [endpoint("10.0.0.9")]))
    nat = f"{lb.bpffs}/noded_nat"
    os.unlink(nat)  # what noded before IPv6 in tc pinned: 20-byte keys, 16-byte values
    subprocess.run(
        [
            "bpftool",
            "map",
            "create",
            nat,
            "type",
            "lru_hash",
            "key",
            "20",
            "value",
            "16",
            "entries",
            "16",
            "name",
            "noded_nat",
        ],
        check=True,
    )
    assert libbpf.pinned_map_sizes(nat) == (20, 16)
    maps = sock_lb.load_and_attach(lb.bpffs, lb.cgroup)  # a restart of the new version
    try:
        assert libbpf.pinned_map_sizes(nat) == (ctypes.sizeof(structs.NatKey), ctypes.sizeof(structs.NatVal))
        # the services' maps were reused, not emptied
        assert any(v.frontend.ip == "10.96.40.1" for v in ebpf.describe(maps))
    finally:
        maps.close()


def test_the_nat_collector_reads_entries_as_the_kernel_lays_them_out():
    from noded.bpf import nat_gc

    assert nat_gc._KEY.size == ctypes.sizeof(structs.NatKey)
    assert nat_gc._VALUE.size == ctypes.sizeof(structs.NatVal)
    offsets = [structs.NatVal.state.offset, structs.NatVal.seen_ns.offset]
    assert offsets == [38, 40]  # where _VALUE's fields 5 and 7 sit


@pytest.mark.parametrize("obj", ["sock_lb.o", "nodeport.o", "sock_term.o", "dns.o"])
def test_every_object_loads_with_its_btf_and_no_libbpf_warning(obj):
    """libbpf retries a map without BTF when the kernel refuses its BTF (an array map keyed by an enum, say):
    the load still works, so only its warning tells. There must be none."""
    from structlog.testing import capture_logs

    from tests.bpf.conftest import unique_tag

    bpffs = f"/sys/fs/bpf/noded/test-{unique_tag()}"
    sock_lb.ensure_bpffs(bpffs)
    loaded = libbpf.Object(sock_lb.object_path(obj))
    try:
        with capture_logs() as logs:
            loaded.pin_maps_under(bpffs)
            loaded.load()
        assert [e for e in logs if e["event"] == "libbpf"] == []
    finally:
        loaded.close()
        sock_lb.remove(bpffs)
