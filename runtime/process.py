"""How a sandboxctl process runs its main coroutine to its end, and then ends, within a grace.

Apart from supervision (runtime/supervise.py) so that a CLI call, which needs this and nothing of
supervising, imports no more than it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

LEFTOVER_GRACE = 5.0  # seconds what is still running after a process's work may take to end


def run_to_exit(main: Coroutine[Any, Any, int], grace: float = LEFTOVER_GRACE) -> int:
    """Run ``main`` to its end, then end the process with its result within ``grace`` seconds more.

    ``asyncio.run`` waits without limit for every task left to finish its cancellation and for
    every thread of the default executor, and the interpreter then joins every other non-daemon
    thread: one step that ignores its cancellation, or one call stuck in a socket (a prompt's
    ``readline`` at Ctrl-C), keeps a stopped process alive for ever. Here each gets ``grace``;
    what is still running after it is logged with its stack and the process exits anyway
    (``os._exit``, once its output is flushed), so a supervisor's stop always ends it.

    The exit code is ``main``'s; 130 after Ctrl-C (the first cancels ``main``, as ``asyncio.run``
    does, so its cleanup runs; one that comes while a handler of main's own is gone interrupts
    the loop); 1 with the traceback for an exception ``main`` let out; a SystemExit's own."""
    threads_before = set(threading.enumerate())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # The loop's default executor, held here: its threads are waited for below, within the grace,
    # instead of by the loop's own shutdown, which waits for ever (and cannot be cancelled).
    pool = ThreadPoolExecutor(thread_name_prefix="sandboxctl-thread")
    loop.set_default_executor(pool)
    task = loop.create_task(main)
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        code = loop.run_until_complete(task)
    except KeyboardInterrupt:
        code = 130
    except asyncio.CancelledError:
        if not interrupted:
            traceback.print_exc()
        code = 130 if interrupted else 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
        left = _end_leftovers(loop, grace)
        pool.shutdown(wait=False, cancel_futures=True)
        asyncio.set_event_loop(None)
        loop.close()
    deadline = time.monotonic() + grace
    stuck = [t for t in _stuck_threads() if t not in threads_before]
    for thread in stuck:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in stuck if t.is_alive()]
    if left or stuck:
        for thread in stuck:
            log.error("thread %s still running at exit:\n%s", thread.name, _thread_stack(thread))
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _end_leftovers(loop: asyncio.AbstractEventLoop, grace: float) -> bool:
    """Cancel the tasks ``main`` left and wait ``grace`` for them; whether any was still running
    after it (each such task is logged with its stack)."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=grace))
    stuck = [task for task in pending if not task.done()]
    for task in stuck:
        frames = "".join(traceback.format_stack(task.get_stack()[-1])) if task.get_stack() else ""
        log.error("task %s ignored its cancellation at exit:\n%s", task.get_name(), frames)
    for task in pending:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())
    loop.run_until_complete(loop.shutdown_asyncgens())
    return bool(stuck)


def _stuck_threads() -> list[threading.Thread]:
    """Non-daemon threads besides this one, which the interpreter would wait for at exit."""
    return [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon and t.is_alive()]


def _thread_stack(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
