"""Istio's standard request metrics and an access log line, per request through the waypoint.

`istio_requests_total` and `istio_request_duration_milliseconds` (Istio's buckets), `istio_request_bytes`
and `istio_response_bytes` sums, with reporter `waypoint` and Istio's labels (the TCP telemetry's, with
`request_protocol` http, `response_code` and `grpc_response_status`). Counters are plain dictionaries
bumped on the loop thread and read at scrape time; label sets are bounded (MAX_SERIES) as the tunnel's.

`AccessLog` writes one line per request in the daemon's log format (key=value after the logger's name, or
JSON), formatted here and written in batches (at most FLUSH_LINES, or every FLUSH_AFTER seconds): through
structlog's console renderer a line cost about as much as the rest of the request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from noded.metrics import LatencyHistogram
from noded.tunnel.telemetry import LABELS as TCP_LABELS
from noded.tunnel.telemetry import MAX_SERIES, UNKNOWN, TcpTelemetry, Workload

LOGGER = "noded.waypoint.access"
FLUSH_LINES = 256
FLUSH_AFTER = 0.2
ACCESS_FIELDS = (  # alphabetical, as the daemon's other lines
    "attempts",
    "authority",
    "destination",
    "destination_service",
    "duration_ms",
    "flags",
    "grpc_status",
    "method",
    "path",
    "policy",
    "request_id",
    "response_code",
    "route",
    "source",
    "source_address",
    "upstream",
)
_TEXT_LINE = (
    "%s [info     ] request                        ["
    + LOGGER
    + "] "
    + " ".join(f"{name}=%s" for name in ACCESS_FIELDS)
    + "\n"
)  # as the daemon's console lines

LABELS = (*TCP_LABELS, "response_code", "grpc_response_status")
BUCKETS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)


def key(
    source: Workload,
    destination: Workload,
    service: tuple[str, str] | None,
    status: int,
    flags: str,
    mtls: bool,
    grpc_status: str | None = None,
    protocol: str = "http",
) -> tuple[str, ...]:
    """LABELS: the tunnel's standard labels for reporter `waypoint`, then response_code and grpc_response_status."""
    labels = TcpTelemetry.key("waypoint", source, destination, service, mtls, protocol, flags or "-")
    return (*labels, str(status), grpc_status or "-")


class RequestTelemetry:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], int] = {}
        self.duration = LatencyHistogram(BUCKETS)  # milliseconds
        self.request_bytes: dict[tuple[str, ...], int] = {}
        self.response_bytes: dict[tuple[str, ...], int] = {}

    def record(self, labels: tuple[str, ...], duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        if labels not in self.requests and len(self.requests) >= MAX_SERIES:
            labels = ("waypoint",) + (UNKNOWN,) * (len(LABELS) - 1)
        self.requests[labels] = self.requests.get(labels, 0) + 1
        self.duration.observe(labels, duration_ms)
        self.request_bytes[labels] = self.request_bytes.get(labels, 0) + request_bytes
        self.response_bytes[labels] = self.response_bytes.get(labels, 0) + response_bytes


class AccessLog:
    def __init__(self, json_lines: bool = False, out=None) -> None:
        self.json = json_lines
        self.out = out  # None: the process's stderr at flush time (where the daemon's log goes)
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._date = ""

    def add(self, values: tuple) -> None:
        """One request's line: `values` of ACCESS_FIELDS, in their order (None written "-", as Envoy does)."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the date part once a second: strftime costs more than the rest
            self._second = second
            self._date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._date}.{int((now - second) * 1e6):06d}Z"
        if self.json:
            fields = dict(zip(ACCESS_FIELDS, values, strict=True))
            line = json.dumps({**fields, "event": "request", "level": "info", "logger": LOGGER, "timestamp": stamp})
            self.lines.append(line + "\n")
        else:
            self.lines.append(_TEXT_LINE % (stamp, *["-" if v is None else v for v in values]))
        if len(self.lines) >= FLUSH_LINES:
            self.flush()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            except RuntimeError:  # no loop (a test): at once
                self.flush()

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.lines:
            return
        out = self.out or sys.stderr
        try:
            out.write("".join(self.lines))
            out.flush()
        except (OSError, ValueError):
            pass  # a closed stream: the lines are dropped, the requests are not
        self.lines.clear()
