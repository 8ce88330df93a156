"""The HTTP servers that face the network (/healthz on 0.0.0.0:10256, health-check node ports): idle
connections cannot hold a thread each (issue 17, item 10)."""

import socket
import threading
import time
import urllib.request

from noded import observe


def test_idle_connections_are_bounded_and_time_out_and_the_server_keeps_answering(monkeypatch):
    monkeypatch.setattr(observe, "CONNECTION_TIMEOUT", 0.5)
    server = observe.serve(("127.0.0.1", 0), {"/healthz": lambda: (200, "text/plain", "ok\n")}, "t")
    port = server.server_address[1]
    threads_before = threading.active_count()
    idle = []
    try:
        for _ in range(300):  # connect and say nothing
            idle.append(socket.create_connection(("127.0.0.1", port)))
        for _ in range(10):  # while the burst is taken: never more threads than the bound
            assert threading.active_count() - threads_before <= observe.MAX_CONNECTIONS
            time.sleep(0.02)
        assert server.refused >= 200  # beyond the bound: closed at once
        time.sleep(1.0)  # the idle ones time out and give their slots back
        assert threading.active_count() - threads_before <= 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
            assert r.status == 200 and r.read() == b"ok\n"
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_livez_fails_only_when_the_proxier_is_stale():
    """kube-proxy's /livez: no first sync yet (the API server away) is alive; a change waiting past the
    timeout, or syncs failing that long since the last good one, is not."""
    import json

    from noded.observe import liveness

    started, timeout = 1_000.0, 61.0
    assert liveness(None, 0.0, None, started, timeout, now=started + 3600, monotonic_now=50)[0] == 200
    assert liveness(40.0, 0.0, None, started, timeout, now=started + 10, monotonic_now=50)[0] == 200
    code, _, body = liveness(40.0, started + 5, None, started, timeout, now=started + 200, monotonic_now=102)
    assert code == 503 and "waited" in json.loads(body)["reason"]
    assert liveness(None, started + 100, "nft: boom", started, timeout, now=started + 150, monotonic_now=0)[0] == 200
    code, _, body = liveness(None, started + 100, "nft: boom", started, timeout, now=started + 200, monotonic_now=0)
    assert code == 503 and "nft: boom" in json.loads(body)["reason"]


def test_json_logs_cover_every_logger_in_the_process_with_its_name_and_level(capsys):
    """--json-logs: noded's structlog lines and the libraries' standard-library ones (the Kubernetes client,
    urllib3, asyncio) are one JSON format, each with its logger's name and level; -v levels."""
    import json
    import logging

    import structlog

    from noded.observe import setup_logging

    try:
        setup_logging("info", json_logs=True)
        structlog.get_logger("noded.test").info("from noded", n=1)
        structlog.get_logger("noded.test").debug("hidden at info")
        logging.getLogger("urllib3.connectionpool").warning("retrying")
        logging.getLogger("asyncio").error("task exception")
        logging.getLogger("kubernetes.client.rest").info("hidden: libraries at warning")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [(d["logger"], d["level"], d["event"]) for d in lines] == [
            ("noded.test", "info", "from noded"),
            ("urllib3.connectionpool", "warning", "retrying"),
            ("asyncio", "error", "task exception"),
        ]
        assert all("timestamp" in d for d in lines) and lines[0]["n"] == 1
        setup_logging("info", json_logs=True, verbosity=2)  # -vv: debug everywhere
        structlog.get_logger("noded.test2").debug("shown")
        logging.getLogger("kubernetes.client.rest").debug("shown too")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [(d["logger"], d["level"]) for d in lines] == [
            ("noded.test2", "debug"),
            ("kubernetes.client.rest", "debug"),
        ]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)
