"""The tunnel's accept loop on real sockets: a failing accept() (EMFILE) pauses the listener instead of
spinning the loop, and connections waiting in the backlog are taken once it resumes."""

from __future__ import annotations

import asyncio
import errno
import socket

from noded.tunnel import relay


class FlakyListener:
    """A real listening socket whose first accept() fails as when the process is out of descriptors."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.failures = 1
        self.calls = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


def test_a_failing_accept_pauses_the_listener_and_then_takes_the_backlog(monkeypatch):
    monkeypatch.setattr(relay, "ACCEPT_RETRY", 0.2)

    async def main():
        listener = FlakyListener()
        got = []
        acceptor = relay.Acceptor(listener, lambda sock, address: got.append(sock))
        client = socket.create_connection(listener.sock.getsockname())
        await asyncio.sleep(0.1)
        assert got == [] and listener.calls == 1  # failed once, then no more tries while paused
        await asyncio.sleep(0.3)
        assert len(got) == 1  # resumed: the connection waiting in the backlog is taken
        got[0].close()
        client.close()
        acceptor.close()

    asyncio.run(main())
