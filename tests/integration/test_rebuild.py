"""Rebuilding the projection, and the state machine's cache at start, from a
long log with the catch-up reader process (bus/bulkread.py), against a
real nats-server: the result must be what the ordinary reader builds, event
for event, and a reader that fails must cost only speed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import nats
import pytest

import sandboxctl.bus.bulkread
import sandboxctl.services.projector
from bench.replay import fill
from sandboxctl.bus.eventlog import append, last_subject_seq
from sandboxctl.events.envelope import Envelope, new_id, now
from sandboxctl.events.lifecycle import SandboxStopRequested
from sandboxctl.runtime.embedded import NatsServer
from sandboxctl.services.projector import Projector
from sandboxctl.services.statemachine import StateMachineService
from tests.conftest import until

EVENTS, SANDBOXES = 3_000, 300
UNREACHABLE = {"servers": ["nats://127.0.0.1:1"]}


def dump(path: Path) -> dict[str, Any]:
    with sqlite3.connect(path) as db:
        return {
            "sandboxes": db.execute("SELECT * FROM sandboxes ORDER BY name").fetchall(),
            "checkpoint": db.execute("SELECT seq FROM checkpoint").fetchall(),
            "indexes": sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")),
        }


async def project(url: str, path: Path, bulk_behind: int) -> Projector:
    nc = await nats.connect(url)
    projector = Projector(nc, path, notify=False, bulk_behind=bulk_behind)
    await projector.start()
    await asyncio.wait_for(projector.caught_up.wait(), 60)
    return projector


async def close(projector: Projector) -> None:
    await projector.stop()
    await projector.nc.close()


@pytest.fixture
async def long_log(nats_server: NatsServer) -> str:
    nc = await nats.connect(nats_server.url)
    try:
        await fill(nc, EVENTS, SANDBOXES)
    finally:
        await nc.close()
    return nats_server.url


async def append_stop_request(url: str, name: str, sandbox_id: str) -> int:
    """One more event after the rebuild, appended as the state machine appends."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        command = new_id()
        envelope = Envelope(
            id=f"{command}:0",
            type=SandboxStopRequested.TYPE,
            source="sandboxctl/statemachine",
            subject=name,
            time=now(),
            data=SandboxStopRequested(sandbox_id=sandbox_id, driver="podman", timeout=1.0),
            actor="test",
            correlationid=command,
            causationid=command,
        )
        ack = await append(js, envelope, await last_subject_seq(js, name))
        return int(ack.seq)
    finally:
        await nc.close()


async def test_catch_up_with_a_reader_process_builds_the_same_projection(
    long_log: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ordinary = await project(long_log, tmp_path / "ordinary.db", bulk_behind=10**9)
    await close(ordinary)
    with caplog.at_level(logging.WARNING, logger="sandboxctl.services.projector"):
        bulk = await project(long_log, tmp_path / "bulk.db", bulk_behind=1)
    try:
        # the reader process did the reading: the ordinary reader did not have to take over
        assert not [r.getMessage() for r in caplog.records if "catch-up reader" in r.getMessage()]
        assert bulk.position == EVENTS
        assert dump(tmp_path / "bulk.db") == dump(tmp_path / "ordinary.db")
        # and it goes on following the log with its ordinary reader
        seq = await append_stop_request(long_log, "sbx-000007", bulk.rows["sbx-000007"].state.sandbox_id)
        await until(lambda: bulk.position >= seq, "the bulk reader at the log's end", every=0.01)
        assert bulk.rows["sbx-000007"].state.phase.value == "Stopping"
    finally:
        await close(bulk)


async def test_a_reader_that_fails_costs_only_speed(
    long_log: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ordinary = await project(long_log, tmp_path / "ordinary.db", bulk_behind=10**9)
    await close(ordinary)
    monkeypatch.setattr(sandboxctl.bus.bulkread, "connect_options", lambda nc: UNREACHABLE)
    with caplog.at_level(logging.WARNING, logger="sandboxctl.services.projector"):
        bulk = await project(long_log, tmp_path / "bulk.db", bulk_behind=1)
    await close(bulk)
    assert any("catch-up reader stopped at 0" in r.getMessage() for r in caplog.records)
    assert dump(tmp_path / "bulk.db") == dump(tmp_path / "ordinary.db")


async def test_a_catch_up_cut_short_resumes_where_its_rows_were_committed(
    long_log: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails after the catch-up's first commit (rows and position of the first
    frame): what the file holds is that position with exactly its rows, and the next start
    resumes from there and finishes the same projection."""
    ordinary = await project(long_log, tmp_path / "ordinary.db", bulk_behind=10**9)
    await close(ordinary)
    monkeypatch.setattr(sandboxctl.services.projector, "ROWS_EVERY", 1)  # commit after every frame
    writes = 0

    def failing(conn: sqlite3.Connection, upserts: list[tuple[object, ...]], last: int) -> None:
        nonlocal writes
        writes += 1
        if writes > 1:
            raise sqlite3.OperationalError("disk I/O error (injected)")
        write(conn, upserts, last)

    write = sandboxctl.services.projector._write_batch
    monkeypatch.setattr(sandboxctl.services.projector, "_write_batch", failing)
    nc = await nats.connect(long_log)
    cut = Projector(nc, tmp_path / "bulk.db", notify=False, bulk_behind=1)
    await cut.start()
    assert cut.tasks
    await until(cut.tasks[0].done, "the cut task's end", every=0.01)
    assert isinstance(cut.tasks[0].exception(), sqlite3.OperationalError)
    await close(cut)
    with sqlite3.connect(tmp_path / "bulk.db") as db:
        (position,) = db.execute("SELECT seq FROM checkpoint").fetchone()
        (newest,) = db.execute("SELECT max(last_seq) FROM sandboxes").fetchone()
    assert 0 < position < EVENTS and newest <= position  # the rows are the position's, no more

    monkeypatch.setattr(sandboxctl.services.projector, "_write_batch", write)
    bulk = await project(long_log, tmp_path / "bulk.db", bulk_behind=1)
    await close(bulk)
    assert dump(tmp_path / "bulk.db") == dump(tmp_path / "ordinary.db")


async def recover(url: str, bulk_behind: int) -> StateMachineService:
    nc = await nats.connect(url)
    service = StateMachineService(nc, drivers=("podman",), bulk_behind=bulk_behind)
    await asyncio.wait_for(service.start(), 60)
    return service


async def stop_service(service: StateMachineService) -> None:
    await service.stop()
    await service.nc.close()


async def test_the_state_machine_recovers_through_a_reader_process_to_the_same_states(
    long_log: str, caplog: pytest.LogCaptureFixture
) -> None:
    ordinary = await recover(long_log, bulk_behind=10**9)
    expected, expected_transient = dict(ordinary.states), set(ordinary._transient)
    await stop_service(ordinary)
    with caplog.at_level(logging.WARNING, logger="sandboxctl.services.statemachine"):
        bulk = await recover(long_log, bulk_behind=1)
    try:
        assert not [r.getMessage() for r in caplog.records if "catch-up reader" in r.getMessage()]
        assert bulk.position == EVENTS and len(expected) == SANDBOXES
        assert bulk.states == expected and bulk._transient == expected_transient
        # and it decides on what it folded, and goes on following the log with its Tail
        seq = await append_stop_request(long_log, "sbx-000011", bulk.states["sbx-000011"].sandbox_id)
        await until(lambda: bulk.position >= seq, "the bulk reader at the log's end", every=0.01)
        assert bulk.states["sbx-000011"].phase.value == "Stopping"
        assert bulk.states["sbx-000011"].seq == seq
    finally:
        await stop_service(bulk)


async def test_a_state_machine_whose_reader_fails_recovers_with_its_tail(
    long_log: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ordinary = await recover(long_log, bulk_behind=10**9)
    expected = dict(ordinary.states)
    await stop_service(ordinary)
    monkeypatch.setattr(sandboxctl.bus.bulkread, "connect_options", lambda nc: UNREACHABLE)
    with caplog.at_level(logging.WARNING, logger="sandboxctl.services.statemachine"):
        bulk = await recover(long_log, bulk_behind=1)
    try:
        assert any("catch-up reader stopped at 0" in r.getMessage() for r in caplog.records)
        assert bulk.position == EVENTS and bulk.states == expected
    finally:
        await stop_service(bulk)
