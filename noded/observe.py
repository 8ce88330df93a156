"""Logging setup, the bounded HTTP server behind /healthz, /livez and /metrics (noded/metrics.py has the
families), liveness, and sd_notify."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

from noded.bounded import BoundedConnections


class _NamedPrintLogger(structlog.PrintLogger):
    """structlog's fast print logger, knowing the name it was asked for (`structlog.get_logger(name)`)."""

    def __init__(self, file: object, name: str) -> None:
        super().__init__(file)
        self.name = name


def _add_logger_name(logger: object, _method: str, event: dict) -> dict:
    event.setdefault("logger", getattr(logger, "name", None) or "noded")
    return event


LOG_FORMAT = {"json": False}  # what setup_logging chose: writers that format their own lines follow it


def setup_logging(level: str = "info", json_logs: bool = False, verbosity: int = 0) -> None:
    """One format for every logger in the process: noded's (structlog) and the libraries' (the Kubernetes
    client, urllib3, asyncio, grpc: through the standard library's logging), each line with its logger's
    name and level, JSON with `json_logs`. `verbosity` 1 (-v) is debug for noded, 2 (-vv) for the libraries
    too; the libraries stay at warning otherwise."""
    own = logging.DEBUG if verbosity >= 1 else getattr(logging, level.upper())
    LOG_FORMAT["json"] = json_logs
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    structlog.configure(
        processors=[*shared, _add_logger_name, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(own),
        logger_factory=lambda *args: _NamedPrintLogger(sys.stderr, str(args[0]) if args else "noded"),
        cache_logger_on_first_use=True,  # a log call on the tunnel's per-connection path costs less
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else max(own, logging.WARNING))
    logging.captureWarnings(True)


Handler = Callable[[], tuple[int, str | dict[str, str], str | bytes]]  # -> (status, content type or headers, body)


MAX_CONNECTIONS = 32  # per server: /healthz, /metrics, each health-check node port
CONNECTION_TIMEOUT = 5.0  # seconds a connection may sit idle or trickle a request


class BoundedHTTPServer(BoundedConnections, ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once (these ports face the network: 0.0.0.0:10256
    and the health-check node ports)."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 drops SYNs under a burst)
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.bound()


def serve(
    address: tuple[str, int], routes: dict[str, Handler], name: str, fallback: Handler | None = None
) -> ThreadingHTTPServer:
    """An HTTP server on its own thread answering GETs from routes (by path), else from fallback, else 404."""

    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?")[0], fallback)
            status, headers, body = route() if route else (404, "text/plain", "not found\n")
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            for key, value in ({"Content-Type": headers} if isinstance(headers, str) else headers).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    _Handler.timeout = CONNECTION_TIMEOUT  # an idle or slow client is dropped, never holds a thread for long
    server = BoundedHTTPServer(address, _Handler)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) something, e.g. READY=1; False when not run under a notify socket."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), path)
    except OSError:  # the manager went away (or never listened): nothing to tell, nothing to fail
        return False
    return True


def liveness(
    pending_since: float | None,
    last_sync: float,
    last_error: str | None,
    started: float,
    timeout: float,
    now: float | None = None,
    monotonic_now: float | None = None,
) -> tuple[int, str, str]:
    """kube-proxy's /livez: /healthz without the node's eligibility, and never failing for lack of a first
    sync (an API server away is no reason for the kubelet to restart noded): 503 only when the proxier is
    stale, a change (pending since `pending_since`, monotonic) waiting longer than `timeout`, or syncs
    failing for that long since the last good one (`last_sync`, wall clock; else since `started`)."""
    now = time.time() if now is None else now
    monotonic_now = time.monotonic() if monotonic_now is None else monotonic_now
    stale = pending_since is not None and monotonic_now - pending_since > timeout
    failing = last_error is not None and now - (last_sync or started) > timeout
    body: dict = {"lastUpdated": rfc3339(last_sync) if last_sync else "", "currentTime": rfc3339(now)}
    if stale or failing:
        body["reason"] = "a change has waited longer than the timeout" if stale else f"syncs failing: {last_error}"
    return (503 if stale or failing else 200), "application/json", json.dumps(body) + "\n"


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
