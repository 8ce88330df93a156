"""The resolver every listener hands its queries to: the cluster zone from the model, the rest forwarded.

One query's path: unparseable → a header-only FORMERR (never larger than the query); a response → no
reply; a client that is not this node's pod or the node itself → REFUSED; a query noded forwarded itself →
SERVFAIL (a loop, see upstream.py); a cluster-zone name → the zone (noded/dns/zone.py), SERVFAIL until
the sources have synced once; everything else → the cache, then the upstreams. Replies fit the transport
(noded/dns/wire.py).

The search-path shortcut (CoreDNS's autopath): a pod's first search expansion `<name>.<ns>.svc.<zone>`
that does not exist is resolved along the rest of the pod's search path here — `<name>.svc.<zone>`,
`<name>.<zone>`, the node's search domains, `<name>.` — and answered with a CNAME to the first name that
exists, so the pod's four or five more queries are never sent and each expansion is forwarded at most once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import structlog

from noded.dns import wire
from noded.dns.cache import AnswerCache, key_of
from noded.dns.upstream import Overloaded, Upstreams
from noded.dns.zone import Answer, ClusterZone
from noded.metrics import DNS_BUCKETS, LatencyHistogram
from noded.model.tracker import ServiceModel

log = structlog.get_logger("noded.dns")
TTL = 5
KERNEL_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)  # what the eBPF fast path answers from its cache
MEMO_SIZE = 10000  # replies kept by query bytes: zone ones until the model changes, cached ones for <= 1 s


@dataclass(frozen=True)
class Client:
    """Who sent a query, as the listener knows it."""

    allowed: bool = True  # a pod of this node or the node itself
    namespace: str | None = None  # the querying pod's namespace, when known
    tcp: bool = False
    family: int = 4  # the query's transport, 4 or 6 (metrics)


def read_resolv_conf(path: str = "/etc/resolv.conf") -> tuple[list[str], list[str]]:
    """(nameservers, search domains) of a resolv.conf."""
    servers: list[str] = []
    search: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) > 1 and words[0] == "nameserver":
                    servers.append(words[1])
                elif words and words[0] in ("search", "domain"):
                    search = words[1:]
    except OSError:
        pass
    return servers, search


class Resolver:
    def __init__(
        self,
        model: ServiceModel,
        upstreams: Upstreams,
        domain: str = "cluster.local",
        ttl: int = TTL,
        cache: AnswerCache | None = None,
        search: list[str] | None = None,
        ready: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.zone = ClusterZone(model, domain, ttl)
        self.upstreams = upstreams
        self.cache = cache if cache is not None else AnswerCache()
        self.ready = ready
        self.clock = clock
        origin = self.zone.origin
        names = [dns.name.from_text(s) for s in search or []]
        self.search = [n for n in names if not n.is_subdomain(origin) and n != dns.name.root]
        kinds = ("queries", "local", "forwarded", "cached", "refused", "servfail", "autopath")
        self.counts = dict.fromkeys(kinds, 0)
        self.stats = DnsStats()
        # told each answer cached from upstream for a plain A/AAAA question: (the reply to it as written for a
        # query without EDNS, stored, expires); the eBPF fast path's cache (noded/bpf/dns_fast.py)
        self.learned: Callable[[bytes, float, float], object] | None = None
        self._memo: dict[tuple[bytes, Client], tuple[bytes, float, int]] = {}  # -> (reply[2:], until, type)
        self._memo_generation = -1

    async def resolve(self, data: bytes, client: Client = Client()) -> bytes | None:
        """The reply to send for one query, or None (a response, or nothing worth answering)."""
        start = time.perf_counter()
        if self._memo_generation != self.zone.model.dns_generation or len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
            self._memo_generation = self.zone.model.dns_generation
        memo_key = (data[2:], client)
        known = self._memo.get(memo_key)
        if known is not None and known[1] > self.clock():  # the same question, bytes for bytes, answered before
            local = known[1] == math.inf
            self.counts["queries"] += 1
            self.counts["local" if local else "cached"] += 1
            out = data[:2] + known[0]
            self.stats.record(known[2], out, client, "kubernetes" if local else "cache", time.perf_counter() - start)
            return out
        token = _ANSWERED_BY.set("")
        try:
            out = await self._resolve(data, client, memo_key)
            if out is not None:
                qtype = type_index(wire.question_type(data))
                self.stats.record(qtype, out, client, _ANSWERED_BY.get(), time.perf_counter() - start)
        finally:
            _ANSWERED_BY.reset(token)
        return out

    async def _resolve(self, data: bytes, client: Client, memo_key: tuple) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return wire.header_error(data, dns.rcode.FORMERR)
        if query.flags & dns.flags.QR:
            return None
        self.counts["queries"] += 1
        limit = wire.MAX_TCP if client.tcp else wire.udp_limit(query)
        generation = self.zone.model.dns_generation
        try:
            reply, until = await self._reply(query, client)
        except Exception:  # a bug must cost one SERVFAIL, not the listener
            log.exception("query failed", question=str(query.question[0]) if query.question else None)
            reply, until = self._error(query, dns.rcode.SERVFAIL), None
        if reply.rcode() == dns.rcode.REFUSED and not client.allowed:
            # never an amplifier for a stranger: a question compressed into a pointer to the header grows when
            # written out again; then the bare 12-byte header, no larger than any parseable query
            out = wire.encode(reply, min(limit, len(data)))
            return out if len(out) <= len(data) else wire.header_error(data, dns.rcode.REFUSED)
        out = wire.encode(reply, limit)
        if until is not None and generation == self._memo_generation:  # with the type label, for the metrics
            qtype = type_index(query.question[0].rdtype if query.question else None)
            self._memo[memo_key] = (out[2:], until, qtype)
        return out

    async def _reply(self, query: dns.message.Message, client: Client) -> tuple[dns.message.Message, float | None]:
        """The reply, and until when the same query bytes get the same reply bytes (inf: until the model
        changes; None: not to be reused)."""
        if len(query.question) != 1:
            return self._error(query, dns.rcode.FORMERR), None
        if query.opcode() != dns.opcode.QUERY:
            return self._error(query, dns.rcode.NOTIMP), None
        if query.edns > 0:
            return self._error(query, dns.rcode.BADVERS), None
        if not client.allowed:
            self.counts["refused"] += 1
            return self._error(query, dns.rcode.REFUSED), None
        if self.upstreams.is_loop(query):
            return self._error(query, dns.rcode.SERVFAIL), None
        q = query.question[0]
        if self.zone.owns(q.name) and not self.ready():
            return self._error(query, dns.rcode.SERVFAIL), False  # the zone is not known yet
        if self.zone.owns(q.name) or self.zone.is_reverse(q.name):
            answer = self.zone.answer(query)
            if answer is not None:
                autopath = answer.reply.rcode() == dns.rcode.NXDOMAIN and client.namespace is not None
                until = math.inf if answer.chase is None and not autopath and not answer.rotated else None
                return await self._finish_local(answer, query, client), until
        return await self._forward(query)

    # -- the cluster zone -------------------------------------------------------------------
    async def _local(self, query: dns.message.Message, client: Client) -> dns.message.Message | None:
        answer = self.zone.answer(query)
        if answer is None:
            return None  # a reverse name the zone does not know
        return await self._finish_local(answer, query, client)

    async def _finish_local(self, answer: Answer, query: dns.message.Message, client: Client) -> dns.message.Message:
        self.counts["local"] += 1
        _ANSWERED_BY.set("kubernetes")
        reply = answer.reply
        reply.flags |= dns.flags.RA  # noded recurses for its clients (CoreDNS leaves RA off here)
        if answer.chase is not None:  # ExternalName to an outside name: its records follow the CNAME
            target, _ = await self._forward(_query_for(answer.chase, query))
            reply.answer += target.answer
            reply.set_rcode(target.rcode())
        elif reply.rcode() == dns.rcode.NXDOMAIN and client.namespace:
            return await self._autopath(query, client.namespace) or reply
        return reply

    async def _autopath(self, query: dns.message.Message, namespace: str) -> dns.message.Message | None:
        q = query.question[0]
        first = dns.name.from_text(f"{namespace}.svc", self.zone.origin)
        if not q.name.is_subdomain(first) or q.name == first:
            return None
        name = q.name.relativize(first)
        candidates = [
            name.derelativize(dns.name.from_text("svc", self.zone.origin)),
            name.derelativize(self.zone.origin),
            *(name.derelativize(domain) for domain in self.search),
            name.derelativize(dns.name.root),
        ]
        for candidate in candidates:
            sub = _query_for(candidate, query)
            if self.zone.owns(candidate):
                result = await self._local(sub, Client())
            else:
                result, _ = await self._forward(sub)
            if result is None or result.rcode() == dns.rcode.NXDOMAIN:
                continue
            if result.rcode() != dns.rcode.NOERROR:
                return None  # the search cannot be finished here: NXDOMAIN for this name, the pod goes on
            self.counts["autopath"] += 1
            reply = dns.message.make_response(query, our_payload=wire.MAX_UDP)
            reply.flags |= dns.flags.RA
            reply.set_rcode(result.rcode())
            reply.answer.append(dns.rrset.from_text(q.name, self.zone.ttl, "IN", "CNAME", candidate.to_text()))
            reply.answer += result.answer
            reply.authority = result.authority
            return reply
        return None

    # -- everything else --------------------------------------------------------------------
    async def _forward(self, query: dns.message.Message) -> tuple[dns.message.Message, float | None]:
        """The answer from the cache or the upstreams, and until when it stays exact (None: do not reuse)."""
        key = key_of(query)
        now = self.clock()
        cached = self.cache.get(key, now)
        if cached is not None:
            self.counts["cached"] += 1
            _ANSWERED_BY.set("cache")
            return _as_reply(query, cached[0]), cached[1]
        self.counts["forwarded"] += 1
        _ANSWERED_BY.set("forward")
        try:
            upstream = await self.upstreams.exchange(key, query)
        except Overloaded:
            return self._error(query, dns.rcode.REFUSED), None
        if upstream is None:  # every upstream failed
            self.counts["servfail"] += 1
            upstream = self._error(query, dns.rcode.SERVFAIL)
        stored = self.clock()
        expires = self.cache.put(key, upstream, stored)
        if expires is not None and self.learned is not None and not key[3] and key[1] in KERNEL_TYPES:
            plain = dns.message.make_query(query.question[0].name, key[1], key[2], use_edns=False)
            try:
                self.learned(wire.encode(_as_reply(plain, upstream), wire.MAX_TCP), stored, expires)
            except Exception as e:  # the kernel cache is an optimisation: userspace answers regardless
                log.warning("answer not put into the kernel cache", question=key[0], error=str(e))
        return _as_reply(query, upstream), None

    def _error(self, query: dns.message.Message, rcode: int) -> dns.message.Message:
        reply = dns.message.make_response(query, our_payload=wire.MAX_UDP)
        if rcode != dns.rcode.REFUSED:
            reply.flags |= dns.flags.RA
        reply.set_rcode(rcode)
        return reply

    def status(self) -> dict:
        return {**self.counts, "cacheEntries": len(self.cache), "upstreams": self.upstreams.status()}


# CoreDNS's `plugin` label: what wrote the answer (kubernetes: the zone; cache; forward: upstream); per task
_ANSWERED_BY: ContextVar[str] = ContextVar("noded_dns_answered_by", default="")
TYPES = ("A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "NAPTR", "DS", "DNSKEY", "HTTPS", "other")
OTHER = len(TYPES) - 1  # CoreDNS's label for any type it does not name
_TYPE_INDEX = {int(dns.rdatatype.from_text(t)): i for i, t in enumerate(TYPES[:-1])}
PLUGINS = ("", "kubernetes", "cache", "forward")
_PLUGIN_INDEX = {p: i for i, p in enumerate(PLUGINS)}


def type_index(rdtype: int | None) -> int:
    return _TYPE_INDEX.get(rdtype, OTHER)  # type: ignore[arg-type]


class DnsStats:
    """CoreDNS's request and response counts and request durations, as flat integer lists bumped on the DNS
    loop (no allocation per query) and turned into labelled families at scrape time: requests by (proto,
    family, type), responses by (rcode, plugin), durations by type."""

    def __init__(self) -> None:
        self._requests = [0] * (len(TYPES) * 4)  # type * 4 + tcp * 2 + ipv6
        self._responses = [0] * (16 * len(PLUGINS))  # rcode * plugins + plugin
        self.duration = LatencyHistogram(DNS_BUCKETS)  # by type index

    def record(self, qtype: int, reply: bytes, client: Client, plugin: str, seconds: float) -> None:
        self._requests[qtype * 4 + client.tcp * 2 + (client.family == 6)] += 1
        rcode = reply[3] & 0x0F if len(reply) > 3 else 2  # SERVFAIL
        self._responses[rcode * 4 + _PLUGIN_INDEX.get(plugin, 0)] += 1
        self.duration.observe(qtype, seconds)

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """(proto, family "1"/"2", type) -> count, for the series that have any."""
        return {
            ("tcp" if i & 2 else "udp", "2" if i & 1 else "1", TYPES[i // 4]): n
            for i, n in enumerate(self._requests)
            if n
        }

    @property
    def responses(self) -> dict[tuple[str, str], int]:
        """(rcode, plugin) -> count."""
        return {(dns.rcode.to_text(i // 4), PLUGINS[i % 4]): n for i, n in enumerate(self._responses) if n}

    def duration_snapshot(self) -> dict[tuple[str], tuple[tuple[float, ...], list[int], float]]:
        return {(TYPES[i],): v for i, v in self.duration.snapshot().items()}


def _query_for(name: dns.name.Name, query: dns.message.Message) -> dns.message.Message:
    """The same question for another name (the client's EDNS and DO bit kept: the cache key uses them)."""
    q = query.question[0]
    sub = dns.message.make_query(name, q.rdtype, q.rdclass)
    if query.edns >= 0:
        sub.use_edns(0, query.ednsflags, query.payload)
    return sub


def _as_reply(query: dns.message.Message, upstream: dns.message.Message) -> dns.message.Message:
    """The client's reply carrying an upstream (or cached) answer: its ID, its question as it wrote it."""
    reply = dns.message.make_response(query, our_payload=wire.MAX_UDP)
    reply.flags |= dns.flags.RA | (upstream.flags & dns.flags.AD)
    reply.set_rcode(upstream.rcode())
    reply.answer = upstream.answer
    reply.authority = upstream.authority
    reply.additional = upstream.additional
    return reply
