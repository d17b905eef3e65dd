"""exec, shell and logs: the CLI's way into a sandbox's container.

They talk to the engine directly, through the driver the sandbox records
(``make_driver`` from the same configuration the services read), because output
streams and terminals do not belong on the log. Everything that is lifecycle
still goes through NATS and the state machine: a Stopped sandbox is started by a
``start`` command, and an exec is activity (a ``touch``) that holds a lease while
it runs, so the reaper never stops a sandbox under a running command. The CLI
therefore needs the engine's socket as well as NATS: it runs where the engines do.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from drivers.base import DriverError
from events.envelope import new_id
from services.client import SandboxClient, Unavailable
from services.config import Config, parse_duration

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


def _driver(config: Config, name: str) -> Any:
    from services.embedded import make_driver

    return make_driver(name, config)


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
) -> int:
    """Run ``command`` in the sandbox and return its exit code, starting a Stopped sandbox first
    unless ``start`` is False (then FailedPrecondition). With ``interactive`` the engine's own
    client runs it attached to this process's terminal (``shell``)."""
    item = await client.get(name)
    if item["phase"] != "Ready" and not start:
        await client.ensure_running(name, start=False, timeout=timeout)  # refuses before anything is logged
    holder = f"exec:{client.actor}:{new_id()[:8]}"
    async with client.lease(name, holder, EXEC_LEASE_TTL):
        item = await client.ensure_running(name, start=start, timeout=timeout)
        await client.touch(name, via="shell" if interactive else "exec")
        driver = _driver(config, item["driver"])
        try:
            if interactive:
                process = await asyncio.create_subprocess_exec(*driver.interactive(name, command, tty))
                return await process.wait()
            code: int = await in_thread(driver.exec, name, command, output)
            return code
        except DriverError as exc:
            raise Unavailable(f"{item['driver']} could not {exc.operation} in sandbox {name}: {exc.message}") from exc
        finally:
            driver.close()


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
) -> None:
    """The container's output, through the driver; reading logs is not activity."""
    item = await client.get(name)
    driver = _driver(config, item["driver"])

    def pump() -> None:
        for chunk in driver.logs(name, tail=tail, since=since, follow=follow):
            output(1, chunk)

    try:
        await in_thread(pump)
    except DriverError as exc:
        raise Unavailable(f"{item['driver']} could not read the logs of sandbox {name}: {exc.message}") from exc
    finally:
        driver.close()
