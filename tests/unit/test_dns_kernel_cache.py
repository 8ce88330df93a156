"""The in-kernel cache's entries as the resolver hands them over (noded/bpf/dns_fast.cached_entry): what the
program needs to serve a reply byte for byte and age its TTLs, and what it must never be given."""

import ctypes

import dns.message
import dns.rrset

from noded.bpf import structs
from noded.bpf.dns_fast import cached_entry


def reply_to(name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.message.make_response(dns.message.make_query(name, rdtype, use_edns=False))


def ttl_at(val: structs.DnsCached, i: int) -> int:
    at = val.ttl_off[i]
    return int.from_bytes(bytes(val.data[at : at + 4]), "big")


def test_a_positive_answer_keeps_its_sections_and_where_each_ttl_sits():
    r = reply_to("www.example.org.")
    r.answer.append(dns.rrset.from_text("www.example.org.", 300, "IN", "CNAME", "edge.example.net."))
    r.answer.append(dns.rrset.from_text_list("edge.example.net.", 60, "IN", "A", ["192.0.2.1", "192.0.2.2"]))
    wire = r.to_wire(want_shuffle=False)
    key, val = cached_entry(wire, 100.0, 130.0)
    assert key.qtype == 1 and bytes(key.name).rstrip(b"\0") == b"\x03www\x07example\x03org"
    question_end = 12 + len(b"\x03www\x07example\x03org\x00") + 4
    assert bytes(val.data[: val.len]) == wire[question_end:]
    assert (val.ancount, val.nscount, val.arcount, val.nttl) == (3, 0, 0, 3)
    assert [ttl_at(val, i) for i in range(3)] == [300, 60, 60]
    assert val.stored_ns == 100_000_000_000 and val.expires_ns == 130_000_000_000
    assert val.flags2 == wire[3]


def test_a_denial_keeps_the_soa_and_its_ttl():
    r = reply_to("nowhere.example.org.", "AAAA")
    r.set_rcode(3)
    r.authority.append(dns.rrset.from_text("example.org.", 900, "IN", "SOA", "ns. host. 1 2 3 4 60"))
    key, val = cached_entry(r.to_wire(), 1.0, 31.0)
    assert key.qtype == 28 and val.flags2 & 0x0F == 3
    assert (val.ancount, val.nscount, val.nttl) == (0, 1, 1) and ttl_at(val, 0) == 900


def test_the_name_is_lowercased_in_the_key_and_kept_as_written_in_the_data():
    r = reply_to("WWW.Example.ORG.")
    r.answer.append(dns.rrset.from_text("www.example.org.", 30, "IN", "A", "192.0.2.9"))
    key, _val = cached_entry(r.to_wire(), 0.0, 1.0)
    assert bytes(key.name).rstrip(b"\0") == b"\x03www\x07example\x03org"


def test_what_the_program_would_not_serve_is_not_handed_over():
    mx = reply_to("example.org.", "MX")
    assert cached_entry(mx.to_wire(), 0, 1) is None  # only A and AAAA
    many = reply_to("many.example.org.")
    addresses = [f"192.0.2.{i}" for i in range(17)]
    many.answer.append(dns.rrset.from_text_list("many.example.org.", 30, "IN", "A", addresses))
    assert cached_entry(many.to_wire(), 0, 1) is None  # more records than it ages
    big = reply_to("big.example.org.")
    text = '"' + "x" * 250 + '" "' + "y" * 250 + '"'
    big.additional.append(dns.rrset.from_text("big.example.org.", 30, "IN", "TXT", text))
    assert cached_entry(big.to_wire(), 0, 1) is None  # more than NODED_DNS_CACHE_DATA bytes
    wire = reply_to("x.example.org.").to_wire()
    assert cached_entry(wire[:20], 0, 1) is None  # cut short
    assert cached_entry(wire[:12] + b"\xc0\x0c" + wire[-4:], 0, 1) is None  # a compressed question
    chaos = bytearray(wire)
    chaos[-1] = 3  # class CH
    assert cached_entry(bytes(chaos), 0, 1) is None
    assert ctypes.sizeof(structs.DnsCached) > structs.DNS_CACHE_DATA
