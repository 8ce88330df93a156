"""The tunnel's client side (noded/tunnel/outbound.py) over real mutual TLS on loopback: an app's connection
carried to the peer and back, a second one on the pooled connection, and a peer presenting another identity
than the destination's refused and counted."""

from __future__ import annotations

import asyncio
import collections
import socket

from noded.tunnel.outbound import HboneClient
from noded.tunnel.telemetry import TcpTelemetry
from tests.unit.test_tunnel_hbone import ca, client_ctx, echo_app, hbone_server  # noqa: F401 (ca: a fixture)
from tests.unit.test_tunnel_identity import ECHO, TD, spiffe_id


async def connect_from(address: tuple[str, int]) -> socket.socket:
    """The capture dials from the pod's netns; here, loopback."""
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


async def app_connection(client: HboneClient, key, ctx, peer, target: str, record: dict):
    """An app's connection handed to the client: (what the app writes to and reads from)."""
    app, handed = socket.socketpair()
    handed.setblocking(False)
    client.carry(handed, key, ctx, peer, target, connect_from, record)
    return await asyncio.open_connection(sock=app)


def test_connections_are_carried_both_ways_and_share_the_pooled_connection(ca, tmp_path):  # noqa: F811
    async def main():
        app, app_port = await echo_app()
        server, port, seen = await hbone_server(ca, tmp_path, lambda *_: True)  # presents ECHO
        counts: collections.Counter[str] = collections.Counter()
        client = HboneClient(TcpTelemetry(), counts, set(), port=port)
        ctx, peer = client_ctx(ca, tmp_path), ("127.0.0.1", ECHO)
        key = ("netns-a", "127.0.0.1", ECHO)
        for n in (1, 2):
            reader, writer = await app_connection(client, key, ctx, peer, f"127.0.0.1:{app_port}", {})
            writer.write(b"hello %d" % n)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"hello %d" % n
            writer.close()
        assert counts["hbone_out"] == 2 and len(seen) == 2
        assert len(client.pool.connections) == 1  # the second went on the first's connection
        client.drop("netns-a")
        assert not client.pool.connections
        server.close()
        app.close()

    asyncio.run(main())


def test_a_peer_presenting_another_identity_is_refused_counted_and_the_app_s_connection_closed(ca, tmp_path):  # noqa: F811
    async def main():
        app, app_port = await echo_app()
        server, port, seen = await hbone_server(ca, tmp_path, lambda *_: True)  # presents ECHO
        client = HboneClient(TcpTelemetry(), collections.Counter(), set(), port=port)
        record: dict = {}
        expected = spiffe_id(TD, "prod", "db")
        reader, _writer = await app_connection(
            client,
            ("netns-a", "127.0.0.1", expected),
            client_ctx(ca, tmp_path),
            ("127.0.0.1", expected),
            f"127.0.0.1:{app_port}",
            record,
        )
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: never plaintext, never the wrong peer
        assert client.refused_peers == 1 and "PeerRejected" in record["error"] and seen == []
        server.close()
        app.close()

    asyncio.run(main())
