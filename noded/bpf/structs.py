"""Python mirrors of bpf/include/noded_lb.h, the one place they are defined on this side.

tests/bpf/test_btf_layout.py checks every size and offset here against the
compiled object's BTF.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

IPPROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in IPPROTO.items()}

BACKEND_TERMINATING = 0x1
SVC_NO_ENDPOINTS = 0x1  # noded_svc_val.flags: no endpoint anywhere; refused, not dropped
SCOPE_SOCKET = 0  # sockets on this node (cgroup hooks)
SCOPE_EXTERNAL = 1  # packets arriving from outside the node (tc)

Addr16 = ctypes.c_uint8 * 16


class SvcKey(ctypes.Structure):
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("slot", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
    ]


class SvcVal(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("svc_id", ctypes.c_uint32),
        ("ready", ctypes.c_uint16),
        ("terminating", ctypes.c_uint16),
        ("affinity_timeout", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class Backend(ctypes.Structure):
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    ]


class RevNatKey(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("pad2", ctypes.c_uint32),
    ]


class RevNatVal(ctypes.Structure):
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("svc_id", ctypes.c_uint32),
    ]


class AffinityKey(ctypes.Structure):
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("client", ctypes.c_uint8 * 16),
        ("svc_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class AffinityVal(ctypes.Structure):
    _fields_ = [
        ("last_used_ns", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class NatKey(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class NatVal(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("seen_ns", ctypes.c_uint64),
        ("seq", ctypes.c_uint32),
        ("backend_id", ctypes.c_uint32),
    ]


CT_NEW, CT_REPLIED, CT_ESTABLISHED, CT_CLOSING = 0, 1, 2, 3  # NODED_CT_* (noded_nat_val.state)
CT_STATES = {CT_NEW: "new", CT_REPLIED: "replied", CT_ESTABLISHED: "established", CT_CLOSING: "closing"}


class CidrKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


DNS_NAME_MAX = 128
DNS_ADDRS_MAX = 8
DNS_CACHE_DATA = 512
DNS_CACHE_TTLS = 16


class DnsKey(ctypes.Structure):
    _fields_ = [("qtype", ctypes.c_uint16), ("pad", ctypes.c_uint16), ("name", ctypes.c_uint8 * DNS_NAME_MAX)]


class DnsVal(ctypes.Structure):
    _fields_ = [("ttl", ctypes.c_uint32), ("count", ctypes.c_uint32), ("addr", Addr16 * DNS_ADDRS_MAX)]


class DnsCached(ctypes.Structure):
    _fields_ = [
        ("stored_ns", ctypes.c_uint64),
        ("expires_ns", ctypes.c_uint64),
        ("len", ctypes.c_uint16),
        ("flags2", ctypes.c_uint8),
        ("nttl", ctypes.c_uint8),
        ("ancount", ctypes.c_uint16),
        ("nscount", ctypes.c_uint16),
        ("arcount", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("ttl_off", ctypes.c_uint16 * DNS_CACHE_TTLS),
        ("data", ctypes.c_uint8 * DNS_CACHE_DATA),
    ]


class DnsListenKey(ctypes.Structure):
    _fields_ = [("addr", Addr16), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class TermKey(ctypes.Structure):
    _fields_ = [
        ("addr", Addr16),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("svc_id", ctypes.c_uint32),
    ]


# C struct name -> mirror, for the layout test (DNS_MIRRORS: of dns.o).
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "noded_svc_key": SvcKey,
    "noded_svc_val": SvcVal,
    "noded_backend": Backend,
    "noded_revnat_key": RevNatKey,
    "noded_revnat_val": RevNatVal,
    "noded_affinity_key": AffinityKey,
    "noded_affinity_val": AffinityVal,
    "noded_nat_key": NatKey,
    "noded_nat_val": NatVal,
    "noded_cidr_key": CidrKey,
    "noded_term_key": TermKey,
}
DNS_MIRRORS: dict[str, type[ctypes.Structure]] = {
    "noded_dns_key": DnsKey,
    "noded_dns_val": DnsVal,
    "noded_dns_cached": DnsCached,
    "noded_dns_listen_key": DnsListenKey,
}

NAT_DIR_INGRESS, NAT_DIR_EGRESS = 0, 1  # noded_nat_key.dir
NAT_REDIRECT, NAT_REPLY = 0x1, 0x2  # noded_nat_val.flags
# noded_dns_stats' keys, in index order (noded/bpf/dns_fast.py names them)
DNS_STAT_ANSWERED, DNS_STAT_PASSED, DNS_STAT_CACHED, DNS_STAT_EXPIRED, DNS_STATS = range(5)

# The enums of bpf/include, member for member (tests/bpf/test_btf_layout.py checks each against the object's
# BTF, which holds them because the fields and map keys they describe are typed by them).
ENUM_MIRRORS: dict[str, dict[str, int]] = {
    "noded_backend_flags": {"NODED_BACKEND_TERMINATING": BACKEND_TERMINATING},
    "noded_svc_flags": {"NODED_SVC_NO_ENDPOINTS": SVC_NO_ENDPOINTS},
    "noded_scope": {"NODED_SCOPE_SOCKET": SCOPE_SOCKET, "NODED_SCOPE_EXTERNAL": SCOPE_EXTERNAL},
    "noded_nat_dir": {"NODED_NAT_DIR_INGRESS": NAT_DIR_INGRESS, "NODED_NAT_DIR_EGRESS": NAT_DIR_EGRESS},
    "noded_nat_flags": {"NODED_NAT_REDIRECT": NAT_REDIRECT, "NODED_NAT_REPLY": NAT_REPLY},
    "noded_ct_state": {
        "NODED_CT_NEW": CT_NEW,
        "NODED_CT_REPLIED": CT_REPLIED,
        "NODED_CT_ESTABLISHED": CT_ESTABLISHED,
        "NODED_CT_CLOSING": CT_CLOSING,
    },
}
DNS_ENUM_MIRRORS: dict[str, dict[str, int]] = {
    "noded_dns_stat": {
        "NODED_DNS_STAT_ANSWERED": DNS_STAT_ANSWERED,
        "NODED_DNS_STAT_PASSED": DNS_STAT_PASSED,
        "NODED_DNS_STAT_CACHED": DNS_STAT_CACHED,
        "NODED_DNS_STAT_EXPIRED": DNS_STAT_EXPIRED,
        "NODED_DNS_STATS": DNS_STATS,
    },
}


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_CODES = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q"}


def packer(cls: type[ctypes.Structure]) -> struct.Struct:
    """A struct.Struct laying out `cls`'s fields at their ctypes offsets (byte arrays as `Ns`, padding as
    `x`): map keys and values packed to bytes in one call where a sync writes hundreds of thousands, derived
    from the one mirror so the layout is never written twice."""
    fmt, at = "=", 0
    for name, ctype in cls._fields_:
        field = getattr(cls, name)
        fmt += "x" * (field.offset - at)
        if ctype in _CODES:
            fmt += _CODES[ctype]
        elif issubclass(ctype, ctypes.Array) and ctype._type_ is ctypes.c_uint8:
            fmt += f"{ctype._length_}s"
        else:
            raise TypeError(f"{cls.__name__}.{name}: no packing for {ctype}")
        at = field.offset + field.size
    fmt += "x" * (ctypes.sizeof(cls) - at)
    out = struct.Struct(fmt)
    assert out.size == ctypes.sizeof(cls), cls.__name__
    return out


def addr_bytes(ip: str) -> bytes:
    """pack_addr's 16 bytes."""
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip)
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        raise ValueError(f"{ip!r} is not an IP address") from None


def pack_addr(ip: str) -> Addr16:
    """16-byte map address: IPv6 as is, IPv4 mapped to ::ffff:a.b.c.d. inet_pton, not ipaddress: a full
    sync packs an address per map entry (200,000 at 10,000 services), and ipaddress's parser was half its
    time; inet_pton rejects the same malformed text (the model has normalised every address already)."""
    return Addr16.from_buffer_copy(addr_bytes(ip))


def unpack_addr(raw: Addr16) -> str:
    addr = ipaddress.IPv6Address(bytes(raw))
    return str(addr.ipv4_mapped or addr)


def net_port(port: int) -> int:
    """A port in network order, as the u16 field holds it on this host."""
    return socket.htons(port)


def host_port(port: int) -> int:
    return socket.ntohs(port)
