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
