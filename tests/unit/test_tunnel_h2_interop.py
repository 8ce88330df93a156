"""noded's HBONE HTTP/2 against another implementation: the `h2` library (what the Python HTTP/2 world uses)
as the peer, over real mutual TLS on loopback, both ways round. The h2 peers keep HTTP/2's defaults (64 KiB
windows, 16 KiB frames), so noded must follow the peer's flow control and frame size, not its own; 1 MiB
each way turns the windows over many times."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import h2.config
import h2.connection
import h2.events
import pytest

from noded.tunnel import ca as ca_mod
from noded.tunnel import frames
from noded.tunnel.ca import CertificateAuthority, create_root
from noded.tunnel.hbone import TunnelRefused, connect, open_request, request
from noded.tunnel.tls import context
from tests.unit.test_tunnel_hbone import echo_app, hbone_server
from tests.unit.test_tunnel_identity import ECHO, SHELL, TD, workload

PAYLOAD = os.urandom(1024 * 1024)


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority(*create_root(TD))


def send_within_window(conn: h2.connection.H2Connection, stream_id: int, payload: bytes, sent: int) -> int:
    """Queue what the peer's windows allow of payload[sent:]; the new `sent`."""
    while sent < len(payload) and conn.local_flow_control_window(stream_id) > 0:
        n = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(payload) - sent)
        conn.send_data(stream_id, payload[sent : sent + n])
        sent += n
    return sent


def _pump(sock, conn: h2.connection.H2Connection, stream_id: int, payload: bytes) -> tuple[dict, bytes]:
    """Drive one h2 stream over a blocking TLS socket: send `payload` within the peer's windows, then
    END_STREAM; collect what comes back until the peer ends. (the response headers, the data)"""
    sent, got, headers, ended = 0, bytearray(), {}, False
    while not ended:
        if sent < len(payload):
            sent = send_within_window(conn, stream_id, payload, sent)
            if sent == len(payload):
                conn.end_stream(stream_id)
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.RequestReceived):
                headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                got += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                ended = True
        sock.sendall(conn.data_to_send())
    return headers, bytes(got)


def test_an_h2_client_talks_to_the_noded_server(ca, tmp_path):
    root = ca_mod.cert_pem(ca.root)
    client_ctx = context(False, workload(ca, SHELL), root, str(tmp_path))

    def h2_client(port: int, authority: str, payload: bytes) -> tuple[dict, bytes]:
        with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="x") as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "CONNECT"), (":authority", authority)])
            return _pump(sock, conn, 1, payload)

    async def main():
        app, app_port = await echo_app()
        server, port, seen = await hbone_server(ca, tmp_path, lambda identity, host, p: p == app_port)
        headers, echoed = await asyncio.to_thread(h2_client, port, f"127.0.0.1:{app_port}", PAYLOAD)
        assert headers[":status"] == "200" and echoed == PAYLOAD
        headers, echoed = await asyncio.to_thread(h2_client, port, "127.0.0.1:9", b"")  # policy: no
        assert headers[":status"] == "401" and echoed == b""
        assert [identity for identity, _host, _port in seen] == [SHELL, SHELL]
        server.close()
        app.close()

    asyncio.run(main())


def test_the_noded_client_talks_to_an_h2_server(ca, tmp_path):
    root = ca_mod.cert_pem(ca.root)
    server_ctx = context(True, workload(ca, ECHO), root, str(tmp_path))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    requests: list[dict] = []

    def send_all(sock, conn, stream_id: int, data: bytes) -> None:
        """`data` within the client's windows, then END_STREAM."""
        sent = 0
        while (sent := send_within_window(conn, stream_id, data, sent)) < len(data):
            sock.sendall(conn.data_to_send())
            conn.receive_data(sock.recv(65536))  # WINDOW_UPDATEs
        conn.end_stream(stream_id)
        sock.sendall(conn.data_to_send())

    def serve_one(sock) -> None:
        """403 to a CONNECT for port 9, else 200 and the stream echoed once the client has ended it."""
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        got = bytearray()
        while data := sock.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests.append(dict(event.headers))
                    refused = dict(event.headers)[":authority"].endswith(":9")
                    conn.send_headers(event.stream_id, [(":status", "403" if refused else "200")], refused)
                elif isinstance(event, h2.events.DataReceived):
                    got += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    sock.sendall(conn.data_to_send())
                    send_all(sock, conn, event.stream_id, bytes(got))
            sock.sendall(conn.data_to_send())

    def h2_server() -> None:
        for _ in range(2):
            raw, _ = listener.accept()
            with server_ctx.wrap_socket(raw, server_side=True) as sock:
                serve_one(sock)

    thread = threading.Thread(target=h2_server, daemon=True)
    thread.start()

    async def main():
        ctx = context(False, workload(ca, SHELL), root, str(tmp_path))
        conn = await connect("127.0.0.1", port, ctx)
        stream = open_request(conn, "10.0.0.1:8080")
        ours, spliced = socket.socketpair()
        spliced.setblocking(False)
        attached = asyncio.ensure_future(stream.attach(spliced))
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(PAYLOAD)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), 20)
        assert echoed == PAYLOAD
        assert (await stream.response)[":status"] == "200"
        writer.close()
        await asyncio.wait_for(attached, 5)
        conn.close()  # the h2 server serves one connection at a time
        conn2 = await connect("127.0.0.1", port, ctx)
        with pytest.raises(TunnelRefused) as refused:
            await request(conn2, "10.0.0.1:9")
        assert refused.value.status == "403"
        conn2.close()

    asyncio.run(main())
    thread.join(5)
    assert [r[":method"] for r in requests] == ["CONNECT", "CONNECT"]
    assert [r[":authority"] for r in requests] == ["10.0.0.1:8080", "10.0.0.1:9"]


def test_header_blocks_decode_with_hpack_and_frames_round_trip():
    import hpack

    first = frames.header_block([(":method", "CONNECT"), (":authority", "[fd44::1]:15008")], first=True)
    later = frames.header_block([(":status", "200"), ("x-long", "v" * 300)], first=False)
    decoder = hpack.Decoder()
    assert decoder.decode(first) == [(":method", "CONNECT"), (":authority", "[fd44::1]:15008")]
    assert decoder.decode(later) == [(":status", "200"), ("x-long", "v" * 300)]
    split = frames.headers(3, later, end_stream=True, max_frame=100)  # HEADERS + CONTINUATION frames
    kinds = []
    pos = 0
    while pos < len(split):
        length = int.from_bytes(split[pos : pos + 3], "big")
        kinds.append((split[pos + 3], split[pos + 4]))
        pos += 9 + length
    assert kinds[0] == (frames.HEADERS, frames.END_STREAM) and kinds[-1] == (frames.CONTINUATION, frames.END_HEADERS)
    assert all(k == (frames.CONTINUATION, 0) for k in kinds[1:-1])
    with pytest.raises(frames.H2Error):
        frames.parse_settings(b"\x00\x05\x00\x00\x00\x01")  # MAX_FRAME_SIZE 1
