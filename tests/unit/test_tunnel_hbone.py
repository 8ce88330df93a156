"""HBONE over real mutual TLS on loopback: a CONNECT stream carries bytes both ways (more than the flow-control
windows), the server learns the client's SPIFFE ID and asks the policy, refuses what the policy denies and
what it cannot reach, and a client with a foreign certificate never gets a stream."""

from __future__ import annotations

import asyncio
import os

import pytest

from noded.tunnel import ca as ca_mod
from noded.tunnel.ca import CertificateAuthority, create_root
from noded.tunnel.hbone import TunnelRefused, open_stream, serve_connection
from noded.tunnel.tls import context
from tests.unit.test_tunnel_identity import ECHO, SHELL, TD, workload


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority(*create_root(TD))


async def echo_app():
    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def hbone_server(ca, tmp_path, authorize):
    root = ca_mod.cert_pem(ca.root)
    seen = []

    def decide(identity, host, port):
        seen.append((identity, host, port))
        return authorize(identity, host, port)

    async def dial(host, port):
        return await asyncio.open_connection(host, port)

    ctx = context(True, workload(ca, ECHO), root, str(tmp_path))
    server = await asyncio.start_server(lambda r, w: serve_connection(r, w, TD, decide, dial), "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], seen


def client_ctx(ca, tmp_path, signer=None):
    return context(False, workload(signer or ca, SHELL), ca_mod.cert_pem(ca.root), str(tmp_path))


def test_a_connect_stream_carries_data_both_ways_and_the_server_knows_the_client(ca, tmp_path):
    async def main():
        app, app_port = await echo_app()
        server, port, seen = await hbone_server(ca, tmp_path, lambda *_: True)
        stream, conn = await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path), f"127.0.0.1:{app_port}")
        payload = os.urandom(10 * 1024 * 1024)  # well past the 4 MiB windows: flow control must turn over

        async def send():
            await stream.write(payload)
            await stream.end()

        async def receive():
            got = bytearray()
            while data := await stream.read():
                got += data
            return bytes(got)

        _, echoed = await asyncio.gather(send(), receive())
        assert echoed == payload
        assert seen == [(SHELL, "127.0.0.1", app_port)]
        conn.cancel()
        server.close()
        app.close()

    asyncio.run(main())


def test_denied_unreachable_and_foreign_clients_are_refused(ca, tmp_path):
    async def main():
        app, app_port = await echo_app()
        server, port, _seen = await hbone_server(ca, tmp_path, lambda identity, host, p: p == app_port)
        with pytest.raises(TunnelRefused) as refused:
            await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path), "127.0.0.1:9")  # policy: no
        assert refused.value.status == "401"
        server.close()
        server, port, _seen = await hbone_server(ca, tmp_path, lambda *_: True)
        with pytest.raises(TunnelRefused) as refused:
            await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path), "127.0.0.1:9")  # nobody there
        assert refused.value.status == "503"
        foreign = CertificateAuthority(*create_root(TD))
        with pytest.raises((ConnectionError, OSError)):
            await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path, signer=foreign), f"127.0.0.1:{app_port}")
        server.close()
        app.close()

    asyncio.run(main())
