"""A lab gRPC workload (grpcio, no generated code): `serve --name N --port P` answers /echo.Echo/Say with
"N:" and the request, the x-request-id it received as trailing metadata; `call HOST PORT` makes a unary and
a server-streaming call and prints JSON (answer, trailers, stream, or the status code of the failure)."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import threading

import grpc


def serve(name: str, port: int) -> None:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-request-id-seen", metadata.get("x-request-id", "")),))
        return name.encode() + b":" + request

    def stream(request: bytes, context: grpc.ServicerContext):
        for i in range(3):
            yield b"%s-%d" % (request, i)

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(say), "Stream": grpc.unary_stream_rpc_method_handler(stream)},
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print(f"{name} serving grpc/{port}", flush=True)
    threading.Event().wait()


def call(host: str, port: int) -> dict:
    # an address, never a name: the machine's own resolver is not the pod's
    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            answer, outcome = channel.unary_unary("/echo.Echo/Say").with_call(b"hello", timeout=10)
            stream = [m.decode() for m in channel.unary_stream("/echo.Echo/Stream")(b"s", timeout=10)]
        except grpc.RpcError as e:
            return {"code": e.code().name, "details": e.details()}
        return {
            "code": "OK",
            "answer": answer.decode(),
            "trailers": dict(outcome.trailing_metadata()),
            "stream": stream,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=9090)
    c = sub.add_parser("call")
    c.add_argument("host")
    c.add_argument("port", type=int)
    args = parser.parse_args()
    if args.verb == "serve":
        serve(args.name, args.port)
    else:
        print(json.dumps(call(args.host, args.port)))


if __name__ == "__main__":
    main()
