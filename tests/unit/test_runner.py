"""The bounded-frequency runner: its schedule on a fake clock, and the thread around it."""

import asyncio
import threading
import time

from noded.runner import AsyncRunner, BoundedFrequencyRunner, NotYet, Schedule


def after_first_sync(min_interval: float, ended: float, ok: bool = True) -> Schedule:
    """A schedule (max 30 s, retry 2 s) whose first, full sync ran at 0 and ended at `ended`."""
    s = Schedule(min_interval, 30.0, 2.0, now=0.0)
    assert s.take(0.0) is True
    s.finished(ended, True, ok=ok)
    return s


def test_the_first_sync_is_at_once_and_full():
    s = Schedule(1.0, 30.0, 2.0, now=100.0)
    assert s.take(100.0) is True
    s.finished(100.1, True, ok=True)
    assert s.take(100.2) is None  # nothing wanted
    assert s.next_at() == 130.1  # the periodic full sync


def test_requests_coalesce_and_keep_the_minimum_gap_from_the_last_sync():
    s = after_first_sync(1.0, 0.5)
    for t in (0.6, 0.7, 0.9):  # three changes within the gap: one sync, when the gap has passed
        s.request(t)
        assert s.take(t) is None
    assert s.next_at() == 1.5
    assert s.take(1.5) is False  # a partial sync
    s.finished(1.6, False, ok=True)
    assert s.take(5.0) is None  # nothing new


def test_a_request_after_a_quiet_spell_syncs_at_once():
    s = after_first_sync(1.0, 0.1)
    s.request(10.0)
    assert s.take(10.0) is False


def test_the_periodic_full_sync_comes_even_without_requests():
    s = after_first_sync(1.0, 0.2)
    assert s.take(30.1) is None
    assert s.take(30.2) is True


def test_a_failed_sync_is_retried_as_a_full_one_after_the_retry_interval():
    s = after_first_sync(0.0, 0.1)
    s.request(5.0)
    assert s.take(5.0) is False
    s.finished(5.1, False, ok=False)
    assert s.take(6.0) is None
    assert s.take(7.1) is True  # full: what the kernel holds is not known


def test_a_request_before_the_retry_is_due_brings_the_full_retry_forward():
    s = Schedule(0.5, 30.0, 5.0, now=0.0)
    s.take(0.0)
    s.finished(1.0, True, ok=False)
    s.request(1.2)
    assert s.take(1.2) is None  # the minimum gap still holds
    assert s.take(1.5) is True


def test_the_runner_coalesces_a_burst_into_few_syncs_and_retries_failures():
    calls: list[bool] = []
    failing = threading.Event()
    failing.set()

    def sync(full: bool) -> None:
        calls.append(full)
        if failing.is_set() and len(calls) == 2:
            raise RuntimeError("kernel said no")

    runner = BoundedFrequencyRunner("test", sync, min_interval=0.2, max_interval=60, retry_interval=0.3)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(50):  # a burst of changes
            runner.run()
            time.sleep(0.002)
        while len(calls) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.5)
        assert calls[0] is True  # the first sync is full
        assert calls[1] is False and runner.syncs >= 3  # the burst: one partial sync (it failed) ...
        assert calls[2] is True  # ... retried as a full one
        assert len(calls) <= 4 and runner.last_error is None
    finally:
        runner.stop()


def test_the_async_runner_waits_quietly_until_it_can_then_syncs_on_requests_from_other_threads():
    calls: list[bool] = []
    ready = threading.Event()

    async def sync(full: bool) -> None:
        if not ready.is_set():
            raise NotYet("sources not synced")
        calls.append(full)

    async def scenario() -> AsyncRunner:
        runner = AsyncRunner("test", sync, min_interval=0.05, max_interval=60, retry_interval=0.05)
        runner.start(asyncio.get_running_loop())
        await asyncio.sleep(0.2)
        assert calls == [] and runner.syncs == 0 and runner.last_error is None  # not yet: no sync, no error
        ready.set()
        await asyncio.sleep(0.2)
        assert calls == [True]  # the first that runs is full
        threading.Thread(target=lambda: [runner.run() for _ in range(20)]).start()  # a burst from a thread
        await asyncio.sleep(0.3)
        runner.stop()
        await asyncio.sleep(0)
        return runner

    runner = asyncio.run(scenario())
    # coalesced: the burst's first request at once, the rest after the minimum gap at most
    assert calls[0] is True and calls[1:] in ([False], [False, False]) and runner.syncs == len(calls)


def test_a_failing_async_sync_is_an_error_retried_as_a_full_one():
    calls: list[bool] = []

    async def sync(full: bool) -> None:
        calls.append(full)
        if len(calls) == 2:
            raise RuntimeError("map full")

    async def scenario() -> AsyncRunner:
        runner = AsyncRunner("test", sync, min_interval=0.0, max_interval=60, retry_interval=0.1)
        runner.start(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        runner.run()
        await asyncio.sleep(0.05)
        assert calls == [True, False] and runner.last_error == "map full"
        await asyncio.sleep(0.2)
        runner.stop()
        return runner

    runner = asyncio.run(scenario())
    assert calls == [True, False, True] and runner.last_error is None
