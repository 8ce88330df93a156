"""HTTP/2 with prior knowledge through the waypoint's proxy, with a real grpcio client and server on loopback
(no root): unary and streaming calls, metadata and trailers (grpc-status and custom ones), a gRPC error
status, request IDs and forwarding headers, the L7 policy refusing (PERMISSION_DENIED to gRPC), and
telemetry records with the grpc status."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid

import grpc
import pytest

from noded.waypoint.http1 import Context, Proxy
from tests.unit.test_waypoint_http1 import FakeUpstream


def start_grpc_server() -> tuple[grpc.Server, int]:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-served-by", "echo"),))
        return b"|".join(
            [request[::-1], metadata.get("x-request-id", "").encode(), metadata.get("x-forwarded-for", "").encode()]
        )

    def stream(request: bytes, context: grpc.ServicerContext):
        for i in range(3):
            yield b"%s-%d" % (request, i)

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def upload(requests, context: grpc.ServicerContext) -> bytes:
        return b"%d" % sum(len(r) for r in requests)

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


async def proxied(upstream):
    records = []
    proxy = Proxy(upstream, records.append)
    ctx = Context("10.0.0.9", "cluster.local/ns/default/sa/shell", "default", "echo", 80, "waypoint")
    server = await asyncio.get_running_loop().create_server(lambda: proxy.protocol(ctx), "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], records


def run_client(port: int, fn):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return fn(channel)


@pytest.fixture(scope="module")
def grpc_backend():
    server, port = start_grpc_server()
    yield port
    server.stop(0)


def test_grpc_unary_streaming_trailers_and_errors_through_the_waypoint(grpc_backend):
    async def main():
        upstream = FakeUpstream(("127.0.0.1", grpc_backend))
        port, records = await proxied(upstream)
        loop = asyncio.get_running_loop()

        def calls(channel):
            say = channel.unary_unary("/echo.Echo/Say")
            answer, call = say.with_call(b"hello", timeout=5)
            stream = [m for m in channel.unary_stream("/echo.Echo/Stream")(b"s", timeout=5)]
            try:
                channel.unary_unary("/echo.Echo/Fail")(b"x", timeout=5)
                failed = None
            except grpc.RpcError as e:
                failed = (e.code(), e.details())
            big = channel.stream_unary("/echo.Echo/Upload")(iter([b"x" * 1_000_000] * 5), timeout=20)
            return answer, dict(call.trailing_metadata()), stream, failed, big

        answer, trailers, stream, failed, big = await loop.run_in_executor(None, run_client, port, calls)
        reversed_, request_id, xff = answer.split(b"|")
        assert reversed_ == b"olleh"
        assert uuid.UUID(request_id.decode()).version == 4  # added by the waypoint
        assert xff == b"10.0.0.9"
        assert trailers["x-served-by"] == "echo"  # trailers come back
        assert stream == [b"s-0", b"s-1", b"s-2"]
        assert failed == (grpc.StatusCode.NOT_FOUND, "no such thing")
        assert big == b"5000000"  # past the windows both ways: flow control turns over
        await asyncio.sleep(0.1)
        statuses = sorted((r.path, r.status, r.grpc_status) for r in records)
        assert statuses == [
            ("/echo.Echo/Fail", 200, "5"),
            ("/echo.Echo/Say", 200, "0"),
            ("/echo.Echo/Stream", 200, "0"),
            ("/echo.Echo/Upload", 200, "0"),
        ]
        assert upstream.connects == 1  # one HTTP/2 connection to the backend carries every call

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_l7_policy_refuses_a_grpc_call_as_permission_denied(grpc_backend):
    async def main():
        upstream = FakeUpstream(("127.0.0.1", grpc_backend))
        upstream.allow = lambda request: request.path != "/echo.Echo/Say"
        port, records = await proxied(upstream)

        def call(channel):
            try:
                channel.unary_unary("/echo.Echo/Say")(b"hello", timeout=5)
            except grpc.RpcError as e:
                return e.code()
            return None

        code = await asyncio.get_running_loop().run_in_executor(None, run_client, port, call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert records[-1].status == 403 and records[-1].flags == "UAEX"
        assert upstream.connects == 0

    asyncio.run(asyncio.wait_for(main(), 60))
