"""What a reply may be on the wire: the size a transport allows, truncation (TC), header-only errors.

UDP replies fit the client's EDNS0 payload size (at least 512, at most 1232, the flag-day value), or 512
without EDNS0; a larger reply goes out with TC set and empty sections, so the client retries over TCP.
TCP allows 65535. An error for a query that cannot be parsed is its 12-byte header echoed, never more
than the query itself.
"""

from __future__ import annotations

import dns.exception
import dns.flags
import dns.message
import dns.rcode

MAX_UDP = 1232
MIN_UDP = 512
MAX_TCP = 65535


def udp_limit(query: dns.message.Message) -> int:
    if query.edns < 0:
        return MIN_UDP
    return max(MIN_UDP, min(query.payload, MAX_UDP))


def encode(reply: dns.message.Message, limit: int) -> bytes:
    """The reply in at most `limit` bytes: whole, or truncated to its question with TC set."""
    if reply.edns >= 0:
        reply.use_edns(reply.edns, reply.ednsflags, MAX_UDP, options=reply.options)  # what noded accepts
    try:  # records in the order the answer holds them (dnspython shuffles by default): the fast path's order
        return reply.to_wire(max_size=limit, want_shuffle=False)
    except dns.exception.TooBig:
        pass
    truncated = dns.message.Message(id=reply.id)
    truncated.flags = reply.flags | dns.flags.TC
    truncated.question = list(reply.question)
    if reply.edns >= 0:
        truncated.use_edns(reply.edns, reply.ednsflags, MAX_UDP)
    truncated.set_rcode(reply.rcode())
    try:
        return truncated.to_wire(max_size=limit, want_shuffle=False)
    except dns.exception.TooBig:  # not even the question fits: the header alone, TC set
        header = truncated.to_wire()[:12]
        return header[:4] + bytes(8)


def header_error(wire: bytes, rcode: int) -> bytes | None:
    """A bare header answering an unparseable query (QR set, no sections); None when it is no query."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    flags = ((wire[2] | 0x80) & 0xF9) << 8 | (rcode & 0xF)  # QR, opcode and RD kept; AA, TC cleared
    return wire[:2] + flags.to_bytes(2, "big") + bytes(8)


def question_name_end(wire: bytes) -> int | None:
    """Where the first question's name ends (just past its root label), read from the bytes; None when the
    name is cut short or compressed."""
    pos = 12
    while pos < len(wire):
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0:
            return None
        pos += 1 + length
    return None


def question_type(wire: bytes) -> int | None:
    """The first question's type, read from the bytes (no parse: a memoized answer has none); None when the
    question is cut short or compressed."""
    end = question_name_end(wire)
    return int.from_bytes(wire[end : end + 2], "big") if end is not None and end + 2 <= len(wire) else None
