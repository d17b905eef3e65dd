"""exec, shell and logs: the CLI's way into a sandbox's container.

They talk to the engine directly, through the driver the sandbox records
(``make_driver`` from the same configuration the services read), because output
streams and terminals do not belong on the log. Everything that is lifecycle
still goes through NATS and the state machine: a Stopped sandbox is started by a
``start`` command, and an exec is activity (a ``touch``) that holds a lease while
it runs, so the reaper never stops a sandbox under a running command. The CLI
therefore needs the engine's socket as well as NATS: it runs where the engines do.

An exec's command lives only as long as the CLI wants it: a signal (Ctrl-C,
SIGTERM, a closed terminal) or a closed output pipe ends it and whatever it
started (drivers.base: its processes carry a mark in their environment and are
signalled from here, or, where this process cannot see them, from inside the
container) before the CLI exits, so no work goes on unseen after the lease is
released. Piped standard input is the command's (``docker exec -i``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

from sandboxctl.client import SandboxClient, Unavailable
from sandboxctl.drivers.base import DriverError, ExecControl
from sandboxctl.events.envelope import new_id
from sandboxctl.runtime.config import ANSWER_TIMEOUT, Config, parse_duration
from sandboxctl.statemachine import Phase

T = TypeVar("T")

EXEC_LEASE_TTL = 60.0  # renewed every 20 s while the command runs; lapses on its own if the CLI dies


def write(fd: int, chunk: bytes) -> None:
    """Copy a chunk of the container's output to our stdout (1) or stderr (2), bytes unchanged."""
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        buffer.write(chunk)
        buffer.flush()
    else:
        stream.write(chunk.decode(errors="replace"))
        stream.flush()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking engine call in a daemon thread: a followed log or a long exec must not
    keep the process alive after Ctrl-C, as asyncio.to_thread's executor would."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, daemon=True, name="sandboxctl-engine").start()
    return await done


def piped_stdin() -> IO[bytes] | None:
    """This process's standard input for an exec to forward, unbuffered; None when it is a
    terminal (an exec does not take the keyboard, like ``docker exec`` without ``-i``: ``shell``
    is for that) or when there is none (closed, or a test harness's stand-in)."""
    try:
        fd = sys.stdin.fileno()
        os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    if os.isatty(fd):
        return None
    return open(fd, "rb", buffering=0, closefd=False)


class Interrupted(Exception):
    """The CLI was told to stop (``signum``) while a command ran; the command has been ended."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"{signal.Signals(signum).name}: the command in sandbox {name} was ended")
        self.signum = signum


# The signals that mean the user or the system wants the CLI gone: an exec ends its command first.
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def engine_driver(config: Config, name: str, answer_timeout: float) -> Any:
    from sandboxctl.runtime.embedded import make_driver

    driver = make_driver(name, config)
    driver.timeout = answer_timeout  # before first use: every engine call here is answered in time, or fails
    return driver


async def exec_in(
    client: SandboxClient,
    config: Config,
    name: str,
    command: list[str],
    start: bool = True,
    timeout: float = 120.0,
    output: Callable[[int, bytes], None] = write,
    interactive: bool = False,
    tty: bool = False,
    stdin: IO[bytes] | None = None,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> int:
    """Run ``command`` in the sandbox and return its exit code, starting a Stopped sandbox first
    unless ``start`` is False (then FailedPrecondition). With ``interactive`` the engine's own
    client runs it attached to this process's terminal (``shell``). ``stdin``, if given, is
    forwarded as the command's standard input until it ends.

    The command does not outlive the caller's interest in it: on SIGINT, SIGTERM or SIGHUP, or
    when ``output`` raises (a closed pipe: BrokenPipeError is raised on), the command and what it
    started are ended before this returns; a signal raises Interrupted. The engine must answer
    each request that sets the command up within ``answer_timeout`` seconds (the command itself
    may run as long as it likes), so a paused engine is an error, not a hang."""
    item = await client.get(name)
    if Phase(item["phase"]) is not Phase.READY and not start:
        await client.ensure_running(name, start=False, timeout=timeout)  # refuses before anything is logged
    holder = f"exec:{client.actor}:{new_id()[:8]}"
    async with client.lease(name, holder, EXEC_LEASE_TTL):
        item = await client.ensure_running(name, start=start, timeout=timeout)
        await client.touch(name, via="shell" if interactive else "exec")
        driver = engine_driver(config, item["driver"], answer_timeout)
        sandbox_id = item["sandbox_id"]
        try:
            if interactive:
                argv = await in_thread(driver.interactive, name, sandbox_id, command, tty)
                process = await asyncio.create_subprocess_exec(*argv)
                return await process.wait()
            return await _run(driver, name, sandbox_id, command, output, stdin)
        except DriverError as exc:
            raise Unavailable(f"{item['driver']} could not {exc.operation} in sandbox {name}: {exc.message}") from exc
        finally:
            driver.close()


async def _run(
    driver: Any,
    name: str,
    sandbox_id: str,
    command: list[str],
    output: Callable[[int, bytes], None],
    stdin: IO[bytes] | None,
) -> int:
    """``driver.exec`` with the ending signals caught while it runs: a signal ends the command
    (in a thread of its own, as that takes engine calls) and then raises Interrupted."""
    control = ExecControl()
    caught: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if not caught:
            caught.append(signum)
            threading.Thread(target=control.abort, daemon=True, name="sandboxctl-exec-end").start()

    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in ENDING:
            installed[signum] = signal.getsignal(signum)
            loop.add_signal_handler(signum, on_signal, signum)
    try:
        code: int = await in_thread(driver.exec, name, sandbox_id, command, output, stdin, control)
    except DriverError:
        if not caught:
            raise
        code = 128 + caught[0]
    finally:
        for signum, previous in installed.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    if caught:
        raise Interrupted(caught[0], name)
    return code


def since_time(text: str) -> float:
    """``--since``: a duration back from now (``10m``) or an ISO 8601 time."""
    try:
        return datetime.now(UTC).timestamp() - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is neither a duration (10m) nor an ISO 8601 time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


async def show_logs(
    client: SandboxClient,
    config: Config,
    name: str,
    tail: int | None = None,
    since: float | None = None,
    follow: bool = False,
    output: Callable[[int, bytes], None] = write,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> None:
    """The container's output, through the driver; reading logs is not activity. The engine must
    answer within ``answer_timeout`` seconds; a followed log may then be silent as long as it likes."""
    item = await client.get(name)
    driver = engine_driver(config, item["driver"], answer_timeout)

    def pump() -> None:
        stream = driver.logs(name, item["sandbox_id"], tail=tail, since=since, follow=follow)
        try:
            for chunk in stream:
                output(1, chunk)
        finally:
            stream.close()

    try:
        await in_thread(pump)
    except DriverError as exc:
        raise Unavailable(f"{item['driver']} could not read the logs of sandbox {name}: {exc.message}") from exc
    finally:
        driver.close()
