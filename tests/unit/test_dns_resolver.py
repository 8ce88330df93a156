"""The resolver on the wire: the spec's queries over UDP and TCP, forwarding, cache, failover, truncation,
the search-path shortcut, loops, the concurrency bound and who may ask. Real sockets on loopback; the
upstreams are real DNS servers (tests/dnsfixtures.py) in the same event loop."""

from __future__ import annotations

import asyncio

import dns.asyncquery
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from noded.dns.cache import AnswerCache
from noded.dns.resolver import Client, Resolver
from noded.dns.server import Clients, serve
from noded.dns.upstream import Upstreams
from tests.dnsfixtures import FakeUpstream, Z, cluster_model, udp_tcp_pair
from tests.objects import endpoint, service, slice_


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_resolver(upstreams, model=None, **kw) -> Resolver:
    pool = kw.pop("pool", None) or Upstreams([u.address for u in upstreams], timeout=kw.pop("timeout", 0.5))
    return Resolver(model or cluster_model(), pool, Z, **kw)


async def listening(resolver, classify=lambda _peer: Client()):
    udp, tcp = udp_tcp_pair()
    closers = await serve(udp, tcp, resolver.resolve, classify)
    return udp.getsockname()[1], closers


async def ask(port, name, rdtype="A", tcp=False, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", timeout=3, port=port)
    return await dns.asyncquery.udp(q, "127.0.0.1", timeout=3, port=port, ignore_trailing=True)


def texts(reply, section="answer"):
    return sorted(r.to_text() for rr in getattr(reply, section) for r in rr)


# -- the specification, query by query, over UDP and over TCP ----------------------------------
SPEC = [
    # (query, type, rcode, answer data) -- Kubernetes DNS-Based Service Discovery 1.1.0, sections 2.3-2.5
    (f"web.default.svc.{Z}", "A", "NOERROR", ["10.96.0.10"]),  # 2.3.1 ClusterIP A
    (f"web.default.svc.{Z}", "AAAA", "NOERROR", ["fd96::10"]),  # 2.3.1 dual-stack AAAA
    (f"_http._tcp.web.default.svc.{Z}", "SRV", "NOERROR", [f"0 100 80 web.default.svc.{Z}."]),  # 2.3.2
    ("10.0.96.10.in-addr.arpa", "PTR", "NOERROR", [f"web.default.svc.{Z}."]),  # 2.3.3
    (f"db.default.svc.{Z}", "A", "NOERROR", ["10.244.1.5", "10.244.2.7"]),  # 2.4.1 headless: ready ones
    (f"db-0.db.default.svc.{Z}", "A", "NOERROR", ["10.244.1.5"]),  # 2.4.1 hostname
    (
        f"_pg._tcp.db.default.svc.{Z}",
        "SRV",
        "NOERROR",
        [  # 2.4.2 one per endpoint
            f"0 50 15432 10-244-2-7.db.default.svc.{Z}.",
            f"0 50 15432 db-0.db.default.svc.{Z}.",
        ],
    ),
    ("5.1.244.10.in-addr.arpa", "PTR", "NOERROR", [f"db-0.db.default.svc.{Z}."]),  # 2.4.3
    (f"pub.default.svc.{Z}", "A", "NOERROR", ["10.244.1.8"]),  # publishNotReadyAddresses
    (f"alias.default.svc.{Z}", "A", "NOERROR", ["10.96.0.10", f"web.default.svc.{Z}."]),  # 2.5 ExternalName
    (f"dns-version.{Z}", "TXT", "NOERROR", ['"1.1.0"']),  # 2.2
    (f"nope.default.svc.{Z}", "A", "NXDOMAIN", []),
    (f"web.default.svc.{Z}", "MX", "NOERROR", []),  # NODATA
    (f"WEB.Default.Svc.{Z.upper()}", "A", "NOERROR", ["10.96.0.10"]),  # case-insensitive
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_the_specification_over_each_transport(transport):
    async def main():
        resolver = make_resolver([])
        port, _ = await listening(resolver)
        for name, rdtype, rcode, data in SPEC:
            reply = await ask(port, name, rdtype, tcp=transport == "tcp")
            assert dns.rcode.to_text(reply.rcode()) == rcode, name
            assert texts(reply) == sorted(data), name
            assert reply.flags & dns.flags.AA, name
            assert reply.question[0].name.to_text() == name.rstrip(".") + ".", "the question's case is kept"
            if not data:
                assert [rr.rdtype for rr in reply.authority] == [dns.rdatatype.SOA], name
                assert reply.authority[0][0].minimum == 5  # negative answers live as long as positive ones
            else:
                assert {rr.ttl for rr in reply.answer} == {5}, name

    asyncio.run(main())


def test_servfail_for_the_cluster_zone_until_the_sources_synced_but_forwarding_works():
    async def main():
        up = await FakeUpstream({"example.org": ["192.0.2.1"]}).start()
        synced = False
        resolver = make_resolver([up], ready=lambda: synced)
        port, _ = await listening(resolver)
        assert (await ask(port, f"web.default.svc.{Z}")).rcode() == dns.rcode.SERVFAIL
        assert texts(await ask(port, "example.org")) == ["192.0.2.1"]
        synced = True
        assert texts(await ask(port, f"web.default.svc.{Z}")) == ["10.96.0.10"]

    asyncio.run(main())


def test_external_names_forwarded_then_cached_with_decreasing_ttls():
    async def main():
        up = await FakeUpstream({"example.org": ["192.0.2.1"]}, ttl=20).start()
        clock = Clock()
        resolver = make_resolver([up], clock=clock, cache=AnswerCache(max_ttl=30))
        port, _ = await listening(resolver)
        first = await ask(port, "Example.ORG")
        assert texts(first) == ["192.0.2.1"] and first.answer[0].ttl == 20 and first.flags & dns.flags.RA
        assert first.question[0].name.to_text() == "Example.ORG."
        clock.now += 7
        second = await ask(port, "example.org")
        assert texts(second) == ["192.0.2.1"] and second.answer[0].ttl == 13  # aged in the cache
        assert up.seen == ["example.org."] and resolver.cache.hits == 1
        clock.now += 14  # past the record's TTL: asked again
        await ask(port, "example.org")
        assert up.seen == ["example.org.", "example.org."]
        # a denial is cached for the SOA's negative TTL (60 here) capped at max_ttl (30)
        assert (await ask(port, "missing.example")).rcode() == dns.rcode.NXDOMAIN
        clock.now += 29
        assert (await ask(port, "missing.example")).rcode() == dns.rcode.NXDOMAIN
        assert up.seen.count("missing.example.") == 1
        clock.now += 2
        await ask(port, "missing.example")
        assert up.seen.count("missing.example.") == 2

    asyncio.run(main())


def test_servfail_is_cached_briefly_when_no_upstream_answers():
    async def main():
        up = await FakeUpstream({}).start()
        up.stop()  # nobody there: ICMP port unreachable
        clock = Clock()
        resolver = make_resolver([up], clock=clock, cache=AnswerCache(servfail_ttl=5))
        port, _ = await listening(resolver)
        assert (await ask(port, "example.org")).rcode() == dns.rcode.SERVFAIL
        assert (await ask(port, "example.org")).rcode() == dns.rcode.SERVFAIL
        assert resolver.counts["forwarded"] == 1 and resolver.counts["cached"] == 1
        clock.now += 6
        await ask(port, "example.org")
        assert resolver.counts["forwarded"] == 2

    asyncio.run(main())


def test_failover_when_an_upstream_dies_and_back_when_its_probe_answers():
    async def main():
        first = await FakeUpstream({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}).start()
        second = await FakeUpstream({"a.example": ["198.51.100.1"], "b.example": ["198.51.100.2"]}).start()
        pool = Upstreams([first.address, second.address], timeout=0.5, max_fails=2, probe_interval=0.1)
        resolver = make_resolver([], pool=pool, cache=AnswerCache(capacity=0))
        port, _ = await listening(resolver)
        assert texts(await ask(port, "a.example")) == ["192.0.2.1"]  # the first is the primary
        first.stop()
        for _ in range(3):  # each answered by the second; after max_fails the first is marked down
            assert texts(await ask(port, "b.example")) == ["198.51.100.2"]
        assert [u.healthy for u in pool.all] == [False, True]
        seen_by_second = len(second.seen)
        await ask(port, "b.example")
        assert len(second.seen) == seen_by_second + 1  # down: not tried first any more
        await first.start()  # back on the same port: the probe marks it up
        for _ in range(50):
            if pool.all[0].healthy:
                break
            await asyncio.sleep(0.05)
        assert pool.all[0].healthy
        assert texts(await ask(port, "a.example")) == ["192.0.2.1"]

    asyncio.run(main())


def test_large_answers_truncate_over_udp_and_come_whole_over_tcp():
    async def main():
        model = cluster_model()
        many = [endpoint(f"10.244.{i // 200}.{i % 200 + 1}") for i in range(100)]
        model.upsert(service("big", "None"))
        model.upsert(slice_("big", many))
        up = await FakeUpstream({"big.example": [f"192.0.2.{i}" for i in range(1, 101)]}).start()
        resolver = make_resolver([up], model=model)
        port, _ = await listening(resolver)
        name = f"big.default.svc.{Z}"
        plain = await ask(port, name)  # no EDNS0: 512 bytes at most
        assert plain.flags & dns.flags.TC and not plain.answer
        edns = await ask(port, name, use_edns=0, payload=4096)  # asks for 4096; noded sends at most 1232
        assert edns.flags & dns.flags.TC and edns.payload == 1232
        assert len(texts(await ask(port, name, tcp=True))) == 100
        # upstream truncates to noded over UDP: noded retries over TCP and has the whole answer
        assert len(texts(await ask(port, "big.example", tcp=True))) == 100
        assert (await ask(port, "big.example")).flags & dns.flags.TC

    asyncio.run(main())


def test_search_path_shortcut_answers_a_pods_expansions_with_one_query_each():
    async def main():
        up = await FakeUpstream({"example.org": ["192.0.2.1"]}).start()
        resolver = make_resolver([up], search=["corp.internal", Z])
        port, _ = await listening(resolver, lambda _peer: Client(namespace="default"))
        # `curl example.org` under ndots:5 first asks example.org.default.svc.<zone>
        reply = await ask(port, f"example.org.default.svc.{Z}")
        assert texts(reply) == ["192.0.2.1", "example.org."]  # CNAME to the name that exists, and its A
        assert reply.rcode() == dns.rcode.NOERROR
        assert up.seen == ["example.org.corp.internal.", "example.org."]  # the zone's expansions: never
        # the pod would then have asked these; none goes upstream again
        for name in (f"example.org.svc.{Z}", f"example.org.{Z}", "example.org.corp.internal", "example.org"):
            await ask(port, name)
        assert up.seen == ["example.org.corp.internal.", "example.org."]
        # `web.default` from a pod in default: found in the zone on the second step, no upstream at all
        reply = await ask(port, f"web.default.default.svc.{Z}")
        assert texts(reply) == ["10.96.0.10", f"web.default.svc.{Z}."]
        assert up.seen == ["example.org.corp.internal.", "example.org."]
        # a pod in another namespace, or the node: the expansion is just NXDOMAIN
        other_port, _ = await listening(resolver, lambda _peer: Client(namespace="other"))
        assert (await ask(other_port, f"example.org.default.svc.{Z}")).rcode() == dns.rcode.NXDOMAIN
        # upstreams failing: the shortcut gives up and the name is just NXDOMAIN (the pod searches on)
        up.stop()
        dead = make_resolver([up], search=["corp.internal"])
        dead_port, _ = await listening(dead, lambda _peer: Client(namespace="default"))
        assert (await ask(dead_port, f"nope.default.svc.{Z}")).rcode() == dns.rcode.NXDOMAIN

    asyncio.run(main())


def test_a_forwarding_loop_is_found_by_a_probe_set_aside_and_used_again_once_gone():
    async def main():
        pool = Upstreams([("127.0.0.1", 9)], timeout=0.5)
        resolver = make_resolver([], pool=pool)
        port, _ = await listening(resolver)
        pool.all[0].port = port  # noded's upstream is noded itself
        await pool.check_loops()
        assert pool.all[0].looping and "loop" in pool.all[0].last_error
        assert (await ask(port, "example.org")).rcode() == dns.rcode.SERVFAIL  # nothing usable: no loop
        # the upstream is fixed: the next round's probe does not come back, and it is used again
        up = await FakeUpstream({"other.example": ["192.0.2.7"]}).start()
        pool.all[0].port = up.port
        await pool.check_loops()
        assert not pool.all[0].looping and pool.all[0].healthy
        assert texts(await ask(port, "other.example")) == ["192.0.2.7"]
        # and an upstream that is one of the listen addresses is never used, nor checked
        own = Upstreams([("169.254.20.10", 53), ("127.0.0.1", 53)], own={("169.254.20.10", 53)})
        assert [u.address for u in own.usable()] == ["127.0.0.1:53"]

    asyncio.run(main())


def test_a_client_cannot_make_an_upstream_look_like_a_loop():
    """Issue 17, item 2: queries repeating the question of one in flight, with every ID, used to disable the
    upstream for good (external names SERVFAIL until restart); a guessed probe name does nothing either."""

    async def main():
        up = await FakeUpstream({"slow.example": ["192.0.2.8"]}, delay=0.3).start()
        pool = Upstreams([up.address], timeout=2)
        resolver = make_resolver([], pool=pool)
        port, _ = await listening(resolver)
        first = asyncio.ensure_future(ask(port, "slow.example"))
        await asyncio.sleep(0.05)
        # a flood over every ID is bound to hit the forwarded query's; here straight the one that matters
        ids = [*up.ids, *range(0, 65536, 331)]
        flood = [resolver.resolve(dns.message.make_query("slow.example", "A", id=i).to_wire(), Client()) for i in ids]
        flood.append(resolver.resolve(dns.message.make_query("x.y.noded-loop-check.", "HINFO").to_wire(), Client()))
        await asyncio.gather(*flood)
        assert texts(await first) == ["192.0.2.8"]
        assert not pool.all[0].looping and pool.all[0].healthy
        assert texts(await ask(port, "slow.example")) == ["192.0.2.8"]

    asyncio.run(main())


def test_identical_questions_share_one_upstream_query_and_the_bound_refuses_beyond():
    async def main():
        up = await FakeUpstream({"a.example": ["192.0.2.1"]}, delay=0.3).start()
        pool = Upstreams([up.address], max_concurrent=2, timeout=2)
        resolver = make_resolver([], pool=pool)
        port, _ = await listening(resolver)
        replies = await asyncio.gather(*(ask(port, "a.example") for _ in range(5)))
        assert all(texts(r) == ["192.0.2.1"] for r in replies) and up.seen == ["a.example."]
        replies = await asyncio.gather(*(ask(port, f"n{i}.example") for i in range(3)))
        assert sorted(dns.rcode.to_text(r.rcode()) for r in replies) == ["NXDOMAIN", "NXDOMAIN", "REFUSED"]

    asyncio.run(main())


def test_only_the_nodes_pods_and_the_node_itself_are_answered():
    pods = {"10.244.1.5": "default"}
    clients = Clients(pods.get, lambda: {"10.0.0.11"})
    assert clients.classify(("10.244.1.5", 5353)) == Client(namespace="default")
    assert clients.classify(("10.0.0.11", 5353)).allowed
    assert clients.classify(("127.0.0.1", 5353)).allowed
    assert clients.classify(("::ffff:10.244.1.5", 5353, 0, 0)).namespace == "default"
    assert not clients.classify(("203.0.113.9", 5353)).allowed

    async def main():
        resolver = make_resolver([])
        port, _ = await listening(resolver, lambda _peer: Client(allowed=False))
        query = dns.message.make_query(f"web.default.svc.{Z}", "A", use_edns=0, payload=4096)
        reply = await dns.asyncquery.udp(query, "127.0.0.1", timeout=3, port=port)
        assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
        assert len(reply.to_wire()) <= len(query.to_wire())  # never larger than what a stranger sent

    asyncio.run(main())


def test_malformed_and_unsupported_queries():
    resolver = make_resolver([])
    good = dns.message.make_query(f"web.default.svc.{Z}", "A")

    def run(wire):
        return asyncio.run(resolver.resolve(wire, Client()))

    assert run(b"\x12\x34garbage") is None  # shorter than a header: nothing
    formerr = run(good.to_wire()[:20])  # a header and half a question: a bare FORMERR header
    assert len(formerr) == 12 and dns.message.from_wire(formerr).rcode() == dns.rcode.FORMERR
    assert run(dns.message.make_response(good).to_wire()) is None  # a response: no reflection
    two = dns.message.make_query(f"web.default.svc.{Z}", "A")
    two.question.append(two.question[0])
    assert dns.message.from_wire(run(two.to_wire())).rcode() == dns.rcode.FORMERR
    notify = dns.message.make_query(f"web.default.svc.{Z}", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(run(notify.to_wire())).rcode() == dns.rcode.NOTIMP
    v1 = dns.message.make_query(f"web.default.svc.{Z}", "A", use_edns=1)
    assert dns.message.from_wire(run(v1.to_wire())).rcode() == dns.rcode.BADVERS


def test_repeated_zone_questions_are_memoized_until_the_model_changes():
    model = cluster_model()
    resolver = make_resolver([], model=model)

    def ask_web(qid):
        q = dns.message.make_query(f"web.default.svc.{Z}", "A", id=qid)
        reply = dns.message.from_wire(asyncio.run(resolver.resolve(q.to_wire(), Client())))
        return reply.id, texts(reply)

    assert ask_web(1) == (1, ["10.96.0.10"])
    assert ask_web(2) == (2, ["10.96.0.10"])  # from the memo: the client's own ID
    assert len(resolver._memo) == 1
    model.upsert(service("web", ["10.96.0.99"]))
    assert ask_web(3) == (3, ["10.96.0.99"])


def test_a_refused_answer_is_never_larger_than_the_query():
    """Issue 17, item 13: a question written as a pointer into the header (ID 0x0a41: a 10-byte label)
    grows when the reply writes it out: 18 bytes in, 28 out, to anyone who may not ask."""

    async def main():
        resolver = make_resolver([])
        query = bytes([0x0A, 0x41, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0]) + b"\xc0\x00" + b"\x00\x01\x00\x01"
        out = await resolver.resolve(query, Client(allowed=False))
        assert out is not None and len(out) <= len(query)
        assert out[:2] == query[:2] and out[3] & 0xF == dns.rcode.REFUSED
        for name in ("a.example.", "x" * 60 + ".example."):
            q = dns.message.make_query(name, "A", use_edns=0).to_wire()
            assert len(await resolver.resolve(q, Client(allowed=False))) <= len(q)

    asyncio.run(main())


def test_a_label_that_is_not_utf8_is_a_name_that_does_not_exist():
    """Found by bench/fuzz.py: the zone decoded labels as UTF-8; a byte like 0xa6 raised (SERVFAIL and a
    traceback in the log per query)."""
    import dns.name

    async def main():
        resolver = make_resolver([])
        name = dns.name.Name([b"\xa6x", b"default", b"svc", *[label.encode() for label in Z.split(".")], b""])
        q = dns.message.make_query(name, "A").to_wire()
        reply = dns.message.from_wire(await resolver.resolve(q, Client(namespace="default")))
        assert reply.rcode() == dns.rcode.NXDOMAIN

    asyncio.run(main())


def test_the_fast_path_sits_on_interfaces_holding_a_pod_gateway_address_of_either_family():
    from noded.dns.service import pod_interfaces

    addresses = {
        "10.244.1.1": ("cni0", 5),
        "fd44:0:0:1::1": ("cni6", 6),  # an IPv6-only cluster's bridge
        "fe80::1%cni0": ("cni0", 5),
        "192.0.2.2": ("eth0", 2),
        "127.0.0.1": ("lo", 1),
    }
    assert pod_interfaces(addresses, ["10.244.0.0/16", "fd44::/48"]) == {"cni0": 5, "cni6": 6}
