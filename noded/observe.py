"""Logging setup, the /healthz + /livez server and the Prometheus /metrics server."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog


def setup_logging(level: str = "info", json_logs: bool = False) -> None:
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


Handler = Callable[[], tuple[int, str, str]]  # -> (status, content type, body)


def serve(address: tuple[str, int], routes: dict[str, Handler], name: str) -> ThreadingHTTPServer:
    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?")[0])
            status, ctype, body = route() if route else (404, "text/plain", "not found\n")
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(address, _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


class Metrics:
    """kube-proxy's metric names where the meaning is the same."""

    def __init__(self) -> None:
        self.sync_durations: list[float] = []
        self.last_sync_timestamp = 0.0
        self.gauges: dict[str, Callable[[], float]] = {}

    def observe_sync(self, seconds: float) -> None:
        self.sync_durations.append(seconds)
        del self.sync_durations[:-1000]
        self.last_sync_timestamp = time.time()

    def render(self) -> str:
        lines = []
        buckets = (0.001, 0.004, 0.016, 0.064, 0.256, 1.024, 4.096, 16.384)
        name = "kubeproxy_sync_proxy_rules_duration_seconds"
        lines.append(f"# TYPE {name} histogram")
        for b in buckets:
            lines.append(f'{name}_bucket{{le="{b}"}} {sum(1 for d in self.sync_durations if d <= b)}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {len(self.sync_durations)}')
        lines.append(f"{name}_sum {sum(self.sync_durations):.6f}")
        lines.append(f"{name}_count {len(self.sync_durations)}")
        lines.append("# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge")
        lines.append(f"kubeproxy_sync_proxy_rules_last_timestamp_seconds {self.last_sync_timestamp:.3f}")
        for gname, fn in sorted(self.gauges.items()):
            lines.append(f"# TYPE {gname} {'counter' if gname.endswith('_total') else 'gauge'}")
            lines.append(f"{gname} {fn()}")
        return "\n".join(lines) + "\n"
