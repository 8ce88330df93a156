import gc
import time

import pytest

from noded.memory import StartupCollection


@pytest.fixture
def collector_on():
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


def test_the_start_runs_without_the_collector_then_freezes_what_it_built(collector_on):
    collection = StartupCollection()
    assert collection.paused and not gc.isenabled()
    built = [{"i": i} for i in range(1000)]  # what a start keeps: its model
    collection.resume()
    assert gc.isenabled() and not collection.paused
    assert gc.get_freeze_count() >= len(built)
    collection.resume()  # once only
    assert gc.isenabled()


def test_a_start_that_never_syncs_gets_its_collector_back(collector_on):
    collection = StartupCollection(limit=0.05)
    assert not gc.isenabled()
    deadline = time.monotonic() + 5
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled() and not collection.paused
    assert gc.get_freeze_count() == 0  # nothing frozen: the start did not finish


def test_a_collector_already_off_is_left_off(collector_on):
    gc.disable()
    collection = StartupCollection()
    assert not collection.paused
    collection.resume()
    assert not gc.isenabled()
