"""HBONE over real mutual TLS on loopback: a CONNECT stream carries bytes both ways (more than the flow-control
windows), the server learns the client's SPIFFE ID and asks the policy, refuses what the policy denies and
what it cannot reach, and a client with a foreign certificate never gets a stream."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from noded.tunnel import ca as ca_mod
from noded.tunnel import h2conn
from noded.tunnel.ca import CertificateAuthority, create_root
from noded.tunnel.hbone import Pool, ServerConnection, TunnelRefused, connect, open_request, open_stream, serve
from noded.tunnel.relay import live, start_connect
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


def dial_local(peer, host, port):
    """The server's dial: a plain connect on loopback (the daemon's is from inside the pod's netns)."""
    sock = socket.socket()
    sock.setblocking(False)
    try:
        return sock, start_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise


async def hbone_server(ca, tmp_path, authorize):
    """An HBONE listener on loopback presenting echo's certificate: (server, port, what it was asked)."""
    root = ca_mod.cert_pem(ca.root)
    seen = []

    def decide(identity, peer, host, port):
        assert peer[0] == "127.0.0.1"
        seen.append((identity, host, port))
        return authorize(identity, host, port)

    ctx = context(True, workload(ca, ECHO), root, str(tmp_path))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = await serve(listener, ctx, lambda: ServerConnection(TD, decide, dial_local))
    return server, listener.getsockname()[1], seen


async def spliced(stream):
    """The test's end of a socket pair whose other end the stream is attached to: (reader, writer, the
    attach task)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    attached = asyncio.ensure_future(stream.attach(theirs))
    reader, writer = await asyncio.open_connection(sock=ours)
    return reader, writer, attached


async def pooled(ca, tmp_path):
    """An echo app behind an HBONE server, and a pool with a dial to it: (app, app_port, server, pool, dial)."""
    app, app_port = await echo_app()
    server, port, _seen = await hbone_server(ca, tmp_path, lambda *_: True)
    ctx = client_ctx(ca, tmp_path)

    async def dial():
        return await connect("127.0.0.1", port, ctx)

    return app, app_port, server, Pool(), dial


def client_ctx(ca, tmp_path, signer=None):
    return context(False, workload(signer or ca, SHELL), ca_mod.cert_pem(ca.root), str(tmp_path))


def test_a_connect_stream_carries_data_both_ways_and_the_server_knows_the_client(ca, tmp_path):
    async def main():
        app, app_port = await echo_app()
        server, port, seen = await hbone_server(ca, tmp_path, lambda *_: True)
        stream, conn = await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path), f"127.0.0.1:{app_port}")
        reader, writer, attached = await spliced(stream)  # what `writer` writes goes into the stream
        payload = os.urandom(10 * 1024 * 1024)  # well past the 4 MiB windows: flow control must turn over

        async def send():
            for i in range(0, len(payload), 100_000):  # in pieces of other sizes than the frames
                writer.write(payload[i : i + 100_000])
                await writer.drain()
            writer.write_eof()

        _, echoed = await asyncio.gather(send(), reader.read())
        assert echoed == payload
        assert seen == [(SHELL, "127.0.0.1", app_port)]
        raw = conn.transport.get_extra_info("socket")  # a node that vanishes is found out by keepalive
        assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 180
        await asyncio.wait_for(attached, 5)  # both directions ended: the splice is done
        assert not conn.streams
        writer.close()
        conn.close()
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


def test_a_stream_used_before_its_answer_is_refused_with_a_plain_end(ca, tmp_path):
    """The client sends at once (no round trip waiting for the 200); a refusal reaches its socket as the end
    of the stream, without an answer and without a reset, and nothing it sent reached the application."""

    async def main():
        got = []

        async def handle(reader, writer):
            got.append(await reader.read())
            writer.close()

        app = await asyncio.start_server(handle, "127.0.0.1", 0)
        app_port = app.sockets[0].getsockname()[1]
        server, port, _seen = await hbone_server(ca, tmp_path, lambda *_: False)
        conn = await connect("127.0.0.1", port, client_ctx(ca, tmp_path))
        for _ in range(3):  # the refused streams leave the pooled connection usable
            stream = open_request(conn, f"127.0.0.1:{app_port}")
            reader, writer, attached = await spliced(stream)  # what `writer` writes goes into the stream
            writer.write(b"early bytes\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()  # the application ends its side too: the splice is over
            await asyncio.wait_for(attached, 5)
            assert stream.response.result()[":status"] == "401"
        assert got == [] and not conn.closed
        conn.close()
        server.close()
        app.close()

    asyncio.run(main())


def test_a_slow_application_holds_back_its_stream_and_then_gets_everything(ca, tmp_path):
    """The application behind the server does not read for a while: its socket fills, the stream stops
    giving window back (the client must stop sending), and once the application reads again the window
    is given back and everything arrives, in order."""

    async def main():
        got = bytearray()
        done = asyncio.Event()

        async def slow(reader, writer):
            await asyncio.sleep(1.0)  # long enough for 16 MiB to back up through the socket and the window
            while data := await reader.read(1 << 20):
                got.extend(data)
            writer.close()
            done.set()

        app = await asyncio.start_server(slow, "127.0.0.1", 0)
        app_port = app.sockets[0].getsockname()[1]
        server, port, _seen = await hbone_server(ca, tmp_path, lambda *_: True)
        stream, conn = await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path), f"127.0.0.1:{app_port}")
        reader, writer, attached = await spliced(stream)  # what `writer` writes goes into the stream
        payload = os.urandom(16 * 1024 * 1024)
        writer.write(payload)
        writer.write_eof()
        await asyncio.wait_for(done.wait(), 20)
        assert bytes(got) == payload
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the application's end reached the client
        writer.close()
        await asyncio.wait_for(attached, 5)
        conn.close()
        server.close()
        app.close()

    asyncio.run(main())


def test_a_replaced_pooled_connection_keeps_its_streams_until_they_end(ca, tmp_path):
    """A renewed certificate (another pool token) gets a new connection; the stream still open on the old
    one keeps working, and the old connection closes once that stream is over."""

    async def main():
        app, app_port, server, pool, dial = await pooled(ca, tmp_path)
        old = await pool.stream("pod", "cert-1", f"127.0.0.1:{app_port}", dial)
        r1, w1, attached1 = await spliced(old)
        w1.write(b"before\n")
        assert await asyncio.wait_for(r1.readline(), 5) == b"before\n"
        new = await pool.stream("pod", "cert-2", f"127.0.0.1:{app_port}", dial)  # renewed: a new connection
        assert new.conn is not old.conn and old.conn.closed and live(old.conn.transport)
        r2, w2, attached2 = await spliced(new)
        w1.write(b"still here\n")  # the old connection's stream goes on
        w2.write(b"new one\n")
        assert await asyncio.wait_for(r1.readline(), 5) == b"still here\n"
        assert await asyncio.wait_for(r2.readline(), 5) == b"new one\n"
        w1.write_eof()
        assert await asyncio.wait_for(r1.read(), 5) == b""
        w1.close()
        await asyncio.wait_for(attached1, 5)
        await asyncio.sleep(0.1)
        assert not live(old.conn.transport)  # closed with its last stream
        assert live(new.conn.transport)
        w2.close()
        await asyncio.wait_for(attached2, 5)
        pool.drop(lambda key: True)
        server.close()
        app.close()

    asyncio.run(main())


def test_an_unused_pooled_connection_is_released(ca, tmp_path, monkeypatch):
    monkeypatch.setattr(h2conn, "POOL_IDLE", 0.3)

    async def main():
        app, app_port, server, pool, dial = await pooled(ca, tmp_path)
        conns = []
        for _ in range(2):  # a stream within the idle time keeps the connection
            stream = await pool.stream("pod", "cert", f"127.0.0.1:{app_port}", dial)
            conns.append(stream.conn)
            _reader, writer, attached = await spliced(stream)
            writer.close()  # the application is done at once: the stream ends
            await asyncio.wait_for(attached, 5)
            await asyncio.sleep(0.1)
            assert live(stream.conn.transport)
        first = conns[0]
        assert conns == [first, first]
        await asyncio.sleep(0.5)
        assert not live(first.transport)  # unused for longer than POOL_IDLE
        assert pool.stream_now("pod", "cert", f"127.0.0.1:{app_port}") is None
        server.close()
        app.close()

    asyncio.run(main())


def test_the_authority_is_an_address_this_listener_serves_never_a_name_or_another_address(ca, tmp_path):
    """Issue 17, item 6: the `:authority` was dialed as sent: loopback, link-local metadata, service VIPs,
    and host names resolved on the event loop (4 s stalls for every pod). Only the pod's own addresses."""
    from noded.tunnel.hbone import split_authority

    for bad in ("localhost:80", "metadata.google.internal:80", "example.com:443", "10.0.0.1:", ":80", "1.2.3.4:٣"):
        with pytest.raises(ValueError):
            split_authority(bad)
    assert split_authority("[fd00::1]:8080") == ("fd00::1", 8080)

    async def main():
        app, app_port = await echo_app()
        root = ca_mod.cert_pem(ca.root)
        dialed = []

        def dial(peer, host, port):
            dialed.append((host, port))
            return dial_local(peer, host, port)

        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        server = await serve(
            listener,
            context(True, workload(ca, ECHO), root, str(tmp_path)),
            lambda: ServerConnection(TD, lambda *_: True, dial, serves=lambda host, _port: host == "127.0.0.2"),
        )
        port = listener.getsockname()[1]
        for target in (f"127.0.0.1:{app_port}", "169.254.169.254:80", "10.96.0.1:443", "example.com:80"):
            with pytest.raises(TunnelRefused) as e:
                await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path), target)
            assert e.value.status == "400", target
        assert dialed == []
        server.close()
        app.close()

    asyncio.run(main())


def test_the_client_refuses_a_server_that_is_not_the_destination_it_expects(ca, tmp_path):
    """Issue 17, item 6: a client expecting ns/prod/sa/db accepted ns/evil/sa/attacker."""
    from noded.tunnel.tls import PeerRejected
    from tests.unit.test_tunnel_identity import spiffe_id

    async def main():
        app, _app_port = await echo_app()
        server, port, seen = await hbone_server(ca, tmp_path, lambda *_: True)  # presents ECHO
        with pytest.raises(PeerRejected, match="expected"):
            await connect("127.0.0.1", port, client_ctx(ca, tmp_path), expect=spiffe_id(TD, "prod", "db"))
        conn = await connect("127.0.0.1", port, client_ctx(ca, tmp_path), expect=ECHO)
        conn.close()
        assert seen == []  # the refused connection never asked for anything
        server.close()
        app.close()

    asyncio.run(main())


def test_a_stream_attached_in_process_carries_data_both_ways_within_the_windows(ca, tmp_path):
    """The waypoint's attachment: the server's dial gives a protocol of this process (h2conn.InProcess); an
    echo on asyncio streams behind it, reading slowly, takes 10 MiB each way (past the 4 MiB windows, so
    the stream's window must be held back and given again) and ends the stream when the client does."""

    async def main():
        ended = asyncio.Event()

        async def echo(reader, writer):
            while data := await reader.read(65536):
                await asyncio.sleep(0)  # a consumer slower than the stream
                writer.write(data)
                await writer.drain()
            writer.close()
            ended.set()

        def dial_in_process(peer, host, port):
            reader = asyncio.StreamReader(limit=64 * 1024)
            return h2conn.InProcess(asyncio.StreamReaderProtocol(reader, echo)), True

        root = ca_mod.cert_pem(ca.root)
        ctx = context(True, workload(ca, ECHO), root, str(tmp_path))
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        server = await serve(listener, ctx, lambda: ServerConnection(TD, lambda *_: True, dial_in_process))
        port = listener.getsockname()[1]
        stream, conn = await open_stream("127.0.0.1", port, client_ctx(ca, tmp_path), "10.0.0.1:80")
        reader, writer, attached = await spliced(stream)
        payload = os.urandom(10 * 1024 * 1024)

        async def send():
            for i in range(0, len(payload), 100_000):
                writer.write(payload[i : i + 100_000])
                await writer.drain()
            writer.write_eof()

        _, echoed = await asyncio.gather(send(), reader.read())
        assert echoed == payload
        await asyncio.wait_for(ended.wait(), 5)
        await asyncio.wait_for(attached, 5)
        assert not conn.streams
        writer.close()
        conn.close()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 60))
