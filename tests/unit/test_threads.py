"""sandboxctl.services.threads.EngineThreads: the driver worker's threads for blocking engine calls."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sandboxctl.services.threads import EngineThreads


async def test_results_and_errors_come_back_from_other_threads() -> None:
    threads = EngineThreads(4, "t")
    try:
        here = threading.get_ident()
        value, ident = await threads.call(lambda a, b: (a + b, threading.get_ident()), 2, 3)
        assert value == 5 and ident != here

        def fail() -> None:
            raise KeyError("no such container")

        with pytest.raises(KeyError, match="no such container"):
            await threads.call(fail)
    finally:
        threads.shutdown()


async def test_a_burst_of_calls_all_get_their_own_answers() -> None:
    threads = EngineThreads(8, "t")
    try:
        answers = await asyncio.gather(*(threads.call(lambda i=i: i * i) for i in range(2000)))
        assert answers == [i * i for i in range(2000)]
    finally:
        threads.shutdown()


async def test_calls_run_side_by_side_up_to_the_limit_and_threads_are_kept() -> None:
    threads = EngineThreads(4, "kept")
    try:
        # Four calls can only pass the barrier together: they must run at once, on four threads.
        barrier = threading.Barrier(4, timeout=10)

        def meet() -> int:
            barrier.wait()
            return threading.get_ident()

        first = await asyncio.gather(*(threads.call(meet) for _ in range(8)))
        assert len(set(first)) == 4
        # One call at a time needs no new thread.
        after = {await threads.call(threading.get_ident) for _ in range(50)}
        assert after <= set(first)
        assert sum(1 for t in threading.enumerate() if t.name.startswith("kept-")) == 4
    finally:
        threads.shutdown()


async def test_callers_that_give_up_do_not_cost_the_others_their_answers() -> None:
    threads = EngineThreads(20, "t")
    release = threading.Event()
    try:
        calls = [threads.call(lambda i=i: (release.wait(10), i)[1]) for i in range(20)]
        await asyncio.sleep(0.05)
        for call in calls[::2]:
            call.cancel()
        release.set()  # all twenty finish at once, their results handed back together
        answers = await asyncio.wait_for(asyncio.gather(*calls[1::2]), 5)
        assert answers == list(range(1, 20, 2))
        assert all(call.cancelled() for call in calls[::2])
        assert await threads.call(lambda: "next") == "next"
    finally:
        threads.shutdown()


async def test_shutdown_does_not_wait_for_a_call_hung_in_the_engine() -> None:
    threads = EngineThreads(2, "hung")
    never = threading.Event()
    hung = asyncio.ensure_future(threads.call(never.wait))
    await asyncio.sleep(0.05)
    threads.shutdown()  # returns at once; the hung thread is a daemon and holds nothing up
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("hung-"))
    with pytest.raises(RuntimeError, match="shut down"):
        threads.call(lambda: None)
    hung.cancel()
    never.set()


async def test_calls_given_up_or_still_queued_at_shutdown_never_run() -> None:
    threads = EngineThreads(1, "queued")
    ran: list[str] = []
    # The one thread is busy while a call queues behind it, and its caller gives up.
    busy = threading.Event()
    first = threads.call(busy.wait, 10)
    given_up = threads.call(ran.append, "given up")
    await asyncio.sleep(0.05)
    given_up.cancel()
    busy.set()
    assert await first is True
    assert await threads.call(lambda: "after") == "after"
    # Busy again, with a call queued when the worker stops.
    busy = threading.Event()
    second = threads.call(busy.wait, 10)
    queued = threads.call(ran.append, "queued at shutdown")
    await asyncio.sleep(0.05)
    threads.shutdown()
    assert queued.cancelled()
    busy.set()
    assert await second is True
    await asyncio.sleep(0.1)
    assert ran == []


async def test_a_result_a_future_cannot_hold_does_not_cost_the_others_theirs() -> None:
    threads = EngineThreads(4, "t")
    release = threading.Event()

    def stop_iteration() -> None:
        release.wait(10)
        raise StopIteration

    try:
        calls = [threads.call(stop_iteration), *(threads.call(lambda i=i: (release.wait(10), i)[1]) for i in range(3))]
        await asyncio.sleep(0.05)
        release.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert isinstance(outcomes[0], RuntimeError) and outcomes[1:] == [0, 1, 2]
    finally:
        threads.shutdown()
