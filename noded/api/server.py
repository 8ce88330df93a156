"""gRPC server of the daemon API on a unix socket: service noded.v1.Noded, JSON messages.

Methods (request -> reply, both JSON objects):
  PodAdd   {containerId, netns, ifName, namespace, name, ips}  -> {ok, error, enrolled}
  PodDel   {containerId}                                        -> {ok, error}
  PodCheck {containerId, netns}                                 -> {ok, error}
  Status   {}                                                   -> the daemon's status document
Every call answers with a reply message (errors in `error`), so the CNI plugin's small client never has
to decode gRPC trailers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent import futures

import grpc
import structlog

log = structlog.get_logger("noded.api")

SERVICE = "noded.v1.Noded"
Handler = Callable[[dict], dict]


def _decode(raw: bytes) -> dict:
    obj = json.loads(raw) if raw else {}
    if not isinstance(obj, dict):
        raise ValueError("the request message is not a JSON object")
    return obj


def _unary(fn: Handler):
    def handle(request: dict, _context: grpc.ServicerContext) -> dict:
        try:
            return fn(request)
        except Exception as e:  # the reply carries the error; the daemon goes on
            log.exception("API call failed", method=fn.__name__)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=_decode, response_serializer=lambda r: json.dumps(r).encode()
    )


def serve(socket_path: str, handlers: dict[str, Handler]) -> grpc.Server:
    os.makedirs(os.path.dirname(socket_path), exist_ok=True)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="api"))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {name: _unary(fn) for name, fn in handlers.items()}),)
    )
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    os.chmod(socket_path, 0o600)
    log.info("API serving", socket=socket_path)
    return server
