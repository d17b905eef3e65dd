"""Threads for blocking engine calls, with a cheap way back to the event loop.

The engine SDKs (podman, docker) are synchronous, so every engine call runs on
a thread. A call is a tuple on a queue and one asyncio future; results go back
through one deque, and the loop is woken once for all the results that arrived
while it was busy (``loop.run_in_executor`` builds two futures, takes a lock
and wakes the loop once per call: on the worker's hot path, that is the cost).

Threads are daemons and are never joined: a call hanging in the engine cannot
hold up the worker's stop or the interpreter's exit, which is what the worker
asks of them.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

_Call = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class EngineThreads:
    """Up to ``max_threads`` threads, started as calls need them and kept for the next ones."""

    def __init__(self, max_threads: int, name: str) -> None:
        self._max = max_threads
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a call, less the calls queued for them
        self._results: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` on a thread; the future has its result or exception."""
        loop = self._loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("engine threads are shut down")
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                start = False
            else:
                start = self._threads < self._max
                if start:
                    self._threads += 1
        self._calls.put((future, fn, args))
        if start:
            threading.Thread(target=self._serve, name=f"{self._name}-{self._threads}", daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args = item
            del item
            if future.cancelled():  # its caller gave up while it queued: an engine call nobody awaits
                with self._lock:
                    self._idle += 1
                del future, fn, args
                continue
            try:
                outcome = (future, True, fn(*args))
            except StopIteration as exc:  # a future cannot hold it
                outcome = (future, False, RuntimeError(f"engine call raised StopIteration: {exc!r}"))
            except BaseException as exc:  # handed to the caller, as run_in_executor would
                outcome = (future, False, exc)
            del future, fn, args  # an idle thread pins neither the call nor its caller
            with self._lock:
                self._idle += 1
                wake = not self._results
                self._results.append(outcome)
            del outcome
            loop = self._loop
            if wake and loop is not None:
                try:
                    loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return

    def _deliver(self) -> None:
        with self._lock:
            results, self._results = self._results, collections.deque()
        for future, ok, value in results:
            if future.cancelled():
                continue
            try:
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            except Exception as exc:  # one bad result must not cost the others theirs
                future.get_loop().call_exception_handler(
                    {"message": "engine call result could not be delivered", "exception": exc, "future": future}
                )

    def shutdown(self) -> None:
        """Drop the calls still queued, let idle threads end; a busy one ends after its call,
        and nobody waits for it. A queued engine call must not run after the worker has
        stopped: its order goes to the next worker, and running it late would act twice."""
        self._closed = True
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._calls.put(None)
