"""Fixtures the unit tests share."""

import pytest

from tests.fakeapi import FakeApiServer


@pytest.fixture
def api():
    """The test API server (the real list/watch protocol) on loopback, stopped afterwards."""
    server = FakeApiServer()
    server.start()
    yield server
    server.stop()
