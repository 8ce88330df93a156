"""Fuzzing the resolver with random and mutated packets (hypothesis): it never raises, never answers a
response, and never replies larger than allowed — the client's UDP limit, a bare 12-byte header for what
does not parse, and no more than the query itself to a client it refuses."""

from __future__ import annotations

import asyncio
import os

import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noded.dns import wire
from noded.dns.resolver import Client, Resolver
from noded.dns.upstream import Upstreams
from tests.dnsfixtures import FakeUpstream, Z, cluster_model

SEEDS = [
    dns.message.make_query(f"web.default.svc.{Z}", "A").to_wire(),
    dns.message.make_query(f"_pg._tcp.db.default.svc.{Z}", "SRV", use_edns=0, payload=4096).to_wire(),
    dns.message.make_query(f"db.default.svc.{Z}", "AAAA", want_dnssec=True).to_wire(),
    dns.message.make_query("10.0.96.10.in-addr.arpa", "PTR").to_wire(),
    dns.message.make_query("example.org", "A", use_edns=0, payload=600).to_wire(),
    dns.message.make_query(f"ext.default.svc.{Z}", "ANY").to_wire(),
]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "byte"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif data:
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_target():
    loop = asyncio.new_event_loop()
    up = loop.run_until_complete(FakeUpstream({"example.org": ["192.0.2.1"]}).start())
    resolver = Resolver(cluster_model(), Upstreams([up.address], timeout=0.5), Z, search=["corp.internal"])
    yield loop, resolver
    up.stop()
    loop.close()


def check(data: bytes, reply: bytes | None, client: Client) -> None:
    if reply is None:
        return
    answer = dns.message.from_wire(reply)
    assert answer.flags & dns.flags.QR and reply[:2] == data[:2]
    try:
        query = dns.message.from_wire(data)
    except Exception:
        assert len(reply) == 12  # unparseable: the bare header, never more
        return
    assert not query.flags & dns.flags.QR  # a response gets no reply
    assert len(reply) <= (wire.MAX_TCP if client.tcp else wire.udp_limit(query))
    if not client.allowed:
        assert len(reply) <= len(data)


CLIENTS = st.sampled_from([Client(), Client(namespace="default"), Client(allowed=False), Client(tcp=True)])


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))  # a longer run: FUZZ_EXAMPLES=100000


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=600), mutated()), client=CLIENTS)
def test_random_and_mutated_packets(fuzz_target, data, client):
    loop, resolver = fuzz_target
    check(data, loop.run_until_complete(resolver.resolve(data, client)), client)
