"""Supervision of the services in a process, against a real nats-server and no engine: a
service that keeps dying ends the process with a clear message (the CLI turns it into a
non-zero exit) instead of leaving it frozen. A service replaced after it died, on a real
engine, is tests/e2e/test_supervise.py."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

import pytest

import sandboxctl.services.projector
from sandboxctl.client import Internal, SandboxClient
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import _run_until_signalled
from testing.hosts import announce_host

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


async def test_a_service_that_keeps_failing_ends_the_process_with_a_clear_message(
    nats_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart that cannot help (a disk that stays full) must not loop quietly for ever: after
    more than ``restart_limit`` failures within ``restart_window`` the run ends with ``internal``,
    which the CLI prints as one line and exits 7 with, for an outer supervisor to act on."""
    break_projection(monkeypatch, failures=10**6)
    nats_config.restart_limit, nats_config.restart_window = 2, 120.0
    # no driver worker: the create is a log event to project, and no container is made
    run = asyncio.create_task(_run_until_signalled(nats_config, "banner", ("statemachine", "projector", "query")))
    client = await SandboxClient.connect(nats_config.nats_url, actor="test")
    try:
        await announce_host(nats_config.nats_url, nats_config.host)  # where the create is placed
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
