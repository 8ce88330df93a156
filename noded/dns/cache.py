"""The answer cache for forwarded names. Sans-IO: the caller passes the time.

Like CoreDNS's cache plugin as NodeLocal DNSCache configures it: separate success and denial caps
(entries, LRU), answers kept for the smallest TTL in them capped at `max_ttl`, denials for the SOA's
negative TTL (RFC 2308) capped the same way, SERVFAIL for `servfail_ttl`. A hit returns the stored reply
with every TTL decreased by its age. The cluster zone is never cached here: it is answered from the model,
so a new Service or pod resolves at once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

CacheKey = tuple[str, int, int, bool]  # (lowercased qname, qtype, qclass, DO bit)


@dataclass
class _Entry:
    reply: dns.message.Message
    stored: float
    expires: float


def key_of(query: dns.message.Message) -> CacheKey:
    q = query.question[0]
    do = bool(query.ednsflags & 0x8000) if query.edns >= 0 else False
    return q.name.to_text().lower(), q.rdtype, q.rdclass, do


def _negative_ttl(reply: dns.message.Message) -> int | None:
    for rrset in reply.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, rrset[0].minimum)
    return None


class AnswerCache:
    def __init__(self, capacity: int = 9984, max_ttl: int = 30, servfail_ttl: int = 5) -> None:
        self.capacity = capacity
        self.max_ttl = max_ttl
        self.servfail_ttl = servfail_ttl
        self._success: collections.OrderedDict[CacheKey, _Entry] = collections.OrderedDict()
        self._denial: collections.OrderedDict[CacheKey, _Entry] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.hits_by_type = {"success": 0, "denial": 0}  # CoreDNS's coredns_cache_hits_total{type}

    def __len__(self) -> int:
        return len(self._success) + len(self._denial)

    def entries(self) -> dict[str, int]:
        return {"success": len(self._success), "denial": len(self._denial)}

    def ttl_for(self, reply: dns.message.Message) -> tuple[int, bool]:
        """(seconds to keep the reply, whether it is a denial); 0 seconds: do not cache."""
        rcode = reply.rcode()
        if reply.flags & dns.flags.TC:
            return 0, False
        if rcode == dns.rcode.SERVFAIL:
            return self.servfail_ttl, True
        if rcode == dns.rcode.NXDOMAIN or (rcode == dns.rcode.NOERROR and not reply.answer):
            negative = _negative_ttl(reply)
            return min(self.max_ttl, negative if negative is not None else self.servfail_ttl), True
        if rcode != dns.rcode.NOERROR:
            return 0, False
        ttls = [rrset.ttl for section in (reply.answer, reply.authority) for rrset in section]
        return min([self.max_ttl, *ttls]), False

    def put(self, key: CacheKey, reply: dns.message.Message, now: float) -> float | None:
        """Keep the reply; until when (None: not cached)."""
        ttl, denial = self.ttl_for(reply)
        if ttl <= 0 or self.capacity <= 0:
            return None
        table = self._denial if denial else self._success
        table[key] = _Entry(reply, now, now + ttl)
        table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)
        return now + ttl

    def get(self, key: CacheKey, now: float) -> tuple[dns.message.Message, float] | None:
        """A copy of the cached reply with its TTLs aged, and until when that copy stays exact (its age in
        whole seconds changes, or it expires); None on a miss."""
        for table, kind in ((self._success, "success"), (self._denial, "denial")):
            entry = table.get(key)
            if entry is None:
                continue
            if now >= entry.expires:
                del table[key]
                break
            table.move_to_end(key)
            self.hits += 1
            self.hits_by_type[kind] += 1
            age = int(now - entry.stored)
            return _aged(entry.reply, age), min(entry.expires, entry.stored + age + 1)
        self.misses += 1
        return None


def _aged(reply: dns.message.Message, age: int) -> dns.message.Message:
    copy = dns.message.from_wire(reply.to_wire(max_size=65535, want_shuffle=False))
    for section in (copy.answer, copy.authority, copy.additional):
        for rrset in section:
            rrset.ttl = max(0, rrset.ttl - age)
    return copy
