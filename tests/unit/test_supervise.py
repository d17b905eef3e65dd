"""The restart policy of supervision, without a server: ``up`` never gives up, ``serve`` gives up
after its limit. Supervision at work is tests/integration/test_supervise.py and tests/e2e/test_supervise.py."""

from __future__ import annotations

from sandboxctl.runtime.config import Config


def test_up_never_gives_up_and_serve_leaves_it_to_its_outer_supervisor() -> None:
    """`up` has nothing above it: a cause that lasts (a disk full for minutes) must not end it.
    `serve` gives up after the limit, for systemd or a container runtime to start it clean."""
    from sandboxctl.runtime.supervise import RESTART_LIMIT, RestartPolicy

    forever = RestartPolicy(limit=0)
    delays = [forever.failed(now=float(i)) for i in range(200)]
    assert None not in delays and max(d for d in delays if d is not None) == forever.cap
    limited = RestartPolicy(limit=RESTART_LIMIT)
    assert [limited.failed(now=float(i)) is None for i in range(RESTART_LIMIT + 1)] == [False] * RESTART_LIMIT + [True]
    assert Config().restarts_allowed == RESTART_LIMIT


# A service's process whose work is done but which leaves behind a task that ignores its
# cancellation and a non-daemon thread stuck in a call: each alone kept ``asyncio.run`` (or the
# interpreter's exit) waiting for ever.
_LINGERING = """
import asyncio, sys, threading, time
from sandboxctl.runtime.process import run_to_exit

async def stubborn() -> None:
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

async def main() -> int:
    asyncio.get_running_loop().create_task(stubborn(), name="stubborn")
    threading.Thread(target=time.sleep, args=(3600,), name="stuck-call").start()
    await asyncio.sleep(0)
    print("work done", flush=True)
    return 3

sys.exit(run_to_exit(main(), grace=float(sys.argv[1])))
"""


def test_a_process_whose_work_is_done_exits_with_its_code_whatever_it_leaves_running() -> None:
    """What still runs after the work gets the grace, is named with its stack, and the process
    exits anyway with its own exit code."""
    import subprocess
    import sys
    import time

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _LINGERING, "0.5"], capture_output=True, text=True, timeout=60, check=False
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 3, done.stderr
    assert done.stdout == "work done\n"
    assert "task stubborn ignored its cancellation at exit" in done.stderr, done.stderr
    assert "in stubborn" in done.stderr  # its stack, to find it by
    assert "thread stuck-call still running at exit" in done.stderr, done.stderr


def test_a_process_with_nothing_left_exits_normally() -> None:
    import subprocess
    import sys

    script = "import sys\nfrom sandboxctl.runtime.process import run_to_exit\n"
    script += "async def main() -> int:\n    return 4\nsys.exit(run_to_exit(main()))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (4, "")


_PROMPT = """
import asyncio, sys
from sandboxctl.runtime.process import run_to_exit

async def main() -> int:
    print("Type yes:", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # nobody answers
    return 0

sys.exit(run_to_exit(main(), grace=0.5))
"""


def test_ctrl_c_at_a_prompt_ends_the_process_with_130_though_a_thread_still_waits_for_input() -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _PROMPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "Type yes:\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        proc.wait()
