"""The plugin-side HTTP/2 client against the daemon's real gRPC server (grpcio): replies past the 64 KiB
initial flow-control window (`noded status` with thousands of services) come through."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from noded.api import h2client
from noded.api.server import serve


@pytest.fixture
def api():
    path = os.path.join(tempfile.mkdtemp(prefix="noded-api-"), "noded.sock")
    big = {"ok": True, "services": [{"name": f"svc-{i}", "ip": f"10.96.{i // 250}.{i % 250}"} for i in range(50_000)]}
    server = serve(path, {"Status": lambda _req: big, "Echo": lambda req: {"ok": True, "got": req}})
    yield path, big
    server.stop(0)


def test_a_reply_larger_than_the_flow_control_window_arrives_whole(api):
    path, big = api
    start = time.monotonic()
    reply = h2client.call(path, "/noded.v1.Noded/Status", {}, timeout=10)
    took = time.monotonic() - start
    assert reply == big  # ~2.5 MiB: forty times the initial window (it stalled at 64 KiB until the timeout)
    assert took < 5, took


def test_a_small_call_still_works(api):
    path, _big = api
    assert h2client.call(path, "/noded.v1.Noded/Echo", {"x": 1}) == {"ok": True, "got": {"x": 1}}
