"""The packers derived from the ctypes mirrors lay out bytes exactly as the mirrors do."""

import ctypes
import random

import pytest

from noded.bpf import structs


def _value(ctype, rng):
    if issubclass(ctype, ctypes.Array):
        return bytes(rng.randrange(256) for _ in range(ctype._length_))
    return rng.randrange(1 << (8 * ctypes.sizeof(ctype)))


@pytest.mark.parametrize("cls", [structs.SvcKey, structs.SvcVal, structs.Backend, structs.DnsKey, structs.NatVal])
def test_packed_bytes_are_the_mirrors_bytes(cls):
    rng = random.Random(cls.__name__)
    packer = structs.packer(cls)
    for _ in range(50):
        values = [_value(ctype, rng) for _name, ctype in cls._fields_]
        obj = cls()
        for (name, ctype), value in zip(cls._fields_, values, strict=True):
            if issubclass(ctype, ctypes.Array):
                ctypes.memmove(getattr(obj, name), value, len(value))
            else:
                setattr(obj, name, value)
        assert packer.pack(*values) == bytes(obj)


def test_addresses_pack_as_the_maps_hold_them():
    assert structs.addr_bytes("10.1.2.3") == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert structs.unpack_addr(structs.pack_addr("fd00::1")) == "fd00::1"
    with pytest.raises(ValueError):
        structs.addr_bytes("10.1.2")


def test_a_field_it_cannot_pack_is_refused_not_guessed():
    with pytest.raises(TypeError, match="ttl_off"):
        structs.packer(structs.DnsCached)  # an array of u16
