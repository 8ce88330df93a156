"""The Python mirrors of the map structs match the compiled object's BTF, field by field."""

import ctypes
import json
import subprocess

from noded.bpf import sock_lb, structs


def btf_structs():
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", sock_lb.object_path()], capture_output=True, text=True, check=True
    )
    return {t["name"]: t for t in json.loads(out.stdout)["types"] if t.get("kind") == "STRUCT"}


def test_every_mirror_matches_btf():
    btf = btf_structs()
    assert set(structs.MIRRORS) <= set(btf), "a mirrored struct is missing from the object's BTF"
    for name, mirror in structs.MIRRORS.items():
        t = btf[name]
        assert ctypes.sizeof(mirror) == t["size"], name
        btf_fields = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
        py_fields = [(f, getattr(mirror, f).offset) for f, *_ in mirror._fields_]
        assert py_fields == btf_fields, name


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
