"""Supervision of the services in a process, against a real nats-server and podman: a
service whose task dies is logged with its exception, replaced by a new instance that
recovers from the log and its own store, and one that keeps dying ends the process with
a clear message (the CLI turns it into a non-zero exit) instead of leaving it frozen."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

import pytest

import sandboxctl.services.projector
from sandboxctl.client import Internal, SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, _run_until_signalled

INJECTED = "database or disk is full (injected)"


def break_projection(monkeypatch: pytest.MonkeyPatch, failures: int) -> Callable[[], int]:
    """The projector's SQLite write fails ``failures`` times (as on a full disk), then works;
    returns how many writes have failed so far."""
    write = sandboxctl.services.projector._write_batch
    failed = 0

    def failing(conn: sqlite3.Connection, upserts: list[tuple[object, ...]], last: int) -> None:
        nonlocal failed
        if failed < failures:
            failed += 1
            raise sqlite3.OperationalError(INJECTED)
        write(conn, upserts, last)

    monkeypatch.setattr(sandboxctl.services.projector, "_write_batch", failing)
    return lambda: failed


async def test_a_projector_whose_database_fails_is_restarted_and_catches_up(
    podman_config: Config, names, image: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failed = break_projection(monkeypatch, failures=1)
    plane = await ControlPlane(podman_config).start()
    client = await SandboxClient.connect(podman_config.nats_url, actor="test")
    try:
        first = plane.projector
        name = names.new()
        with caplog.at_level(logging.INFO, logger="sandboxctl.runtime.supervise"):
            reply = await client.create(name, image)
            # the create's events fail the first write; the projector is replaced, refolds the log
            # from its checkpoint, and the waiter sees the sandbox Ready
            item = await client.wait_for(name, "Ready", reply.seq, timeout=60)
        assert failed() == 1 and item["phase"] == "Ready"
        assert plane.projector is not first and all(t.done() for t in first.tasks)
        slot = next(s for s in plane.supervisor.slots if s.name == "projector")
        assert slot.restarts == 1 and slot.state == "ok"
        messages = [r.getMessage() for r in caplog.records]
        failure = next(r for r in caplog.records if r.getMessage().startswith("projector failed"))
        assert INJECTED in failure.getMessage() and failure.exc_info is not None  # with its exception
        assert any(m.startswith("projector is back") for m in messages), messages
        info = await plane.statemachine.js.stream_info(subjects.LOG_STREAM)
        assert plane.projector.position == info.state.last_seq  # caught up with the whole log
        # the other services were left alone
        assert all(s.restarts == 0 for s in plane.supervisor.slots if s.name != "projector")
    finally:
        await client.close()
        await plane.stop()


async def test_a_service_that_keeps_failing_ends_the_process_with_a_clear_message(
    podman_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart that cannot help (a disk that stays full) must not loop quietly for ever: after
    more than ``restart_limit`` failures within ``restart_window`` the run ends with ``internal``,
    which the CLI prints as one line and exits 7 with, for an outer supervisor to act on."""
    break_projection(monkeypatch, failures=10**6)
    podman_config.restart_limit, podman_config.restart_window = 2, 120.0
    # no driver worker: the create is a log event to project, and no container is made
    run = asyncio.create_task(_run_until_signalled(podman_config, "banner", ("statemachine", "projector", "query")))
    client = await SandboxClient.connect(podman_config.nats_url, actor="test")
    try:
        for _ in range(200):  # until the services are up
            try:
                await client.create("never-made", "localhost/none:latest")
                break
            except Exception:
                await asyncio.sleep(0.1)
        with pytest.raises(Internal) as raised:
            await asyncio.wait_for(run, 60)
        assert raised.value.code == "internal"
        assert "projector failed 3 times within 120s" in raised.value.message
        assert INJECTED in raised.value.message and "outer supervisor" in raised.value.message
    finally:
        await client.close()
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


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
