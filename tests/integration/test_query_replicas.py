"""Two query replicas, each beside a projector of its own (its own SQLite), against one log: a
client's reads never go backwards, whichever replica answers. It has seen the log sequence of
its own writes, asks each read for at least that, and a replica whose projector is behind waits
for it or answers ``unavailable``, which the client asks again. A real nats-server and the state
machine; no engine is needed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from sandboxctl.bus import snapshots
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.replies import ErrorCode, Reply
from sandboxctl.runtime.embedded import NatsServer
from sandboxctl.services.projection import SCHEMA_VERSION
from sandboxctl.services.projector import Projector
from sandboxctl.services.query import QueryService
from sandboxctl.services.statemachine import StateMachineService
from tests.conftest import until

IMAGE = "localhost/sandboxctl-busybox:latest"


class Replica:
    """A projector and a query service on a SQLite file of their own, each on its own connection;
    it records what its query service answered."""

    def __init__(self, url: str, path: Path) -> None:
        self.url, self.path = url, path
        self.projector: Projector | None = None
        self.answers: list[Reply] = []

    async def start_projector(self) -> None:
        self.projector = Projector(await nats.connect(self.url), self.path)
        await self.projector.start()

    async def stop_projector(self) -> None:
        assert self.projector is not None
        await self.projector.stop()
        await self.projector.nc.close()
        self.projector = None

    async def start(self) -> Replica:
        await self.start_projector()
        self.query = QueryService(await nats.connect(self.url), self.path)
        answer = self.query.handle

        async def recorded(kind: str, payload: bytes) -> Reply:
            reply = await answer(kind, payload)
            self.answers.append(reply)
            return reply

        self.query.handle = recorded  # type: ignore[method-assign]
        await self.query.start()
        return self

    async def stop(self) -> None:
        if self.projector is not None:
            await self.stop_projector()
        await self.query.stop()
        await self.query.nc.close()


@pytest.fixture
async def replicas(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    machine = StateMachineService(await nats.connect(nats_server.url))
    await machine.start()
    started = [await Replica(nats_server.url, tmp_path / f"r{i}" / "projection.sqlite3").start() for i in range(2)]
    yield started
    for replica in started:
        await replica.stop()
    await machine.stop()
    await machine.nc.close()


async def test_a_client_reads_its_own_writes_and_never_older_whichever_replica_answers(
    nats_server: NatsServer, nc: NATS, replicas: list[Replica]
) -> None:
    fresh, behind = replicas
    client = SandboxClient(nc, actor="test", retries=12)
    await behind.stop_projector()  # this replica's projection stops where it is
    names = [f"mono-{i}" for i in range(5)]
    for name in names:
        await client.create(name, IMAGE, driver="podman")
    written = client.seen
    assert written > 0

    async def read_all() -> None:
        for _ in range(8):
            for name in names:
                before = client.seen
                item = await client.get(name)  # never "not found": the client wrote it
                assert item["name"] == name and item["last_seq"] <= client.seen
                assert client.seen >= before  # and what it has seen never goes back
            rows = await client.list()
            assert {r["name"] for r in rows} >= set(names)

    reading = asyncio.create_task(read_all())
    await asyncio.sleep(1.5)
    await behind.start_projector()  # it catches up, and answers again
    await reading
    # every answer either reflected at least what the client had seen, or said it could not
    for replica in replicas:
        for reply in replica.answers:
            if reply.error is not None:
                assert reply.error.code == ErrorCode.UNAVAILABLE and "behind" in reply.error.message, reply
            else:
                assert reply.position > 0
    said_behind = [r for r in behind.answers if r.error is not None]
    assert said_behind, "the replica behind was never asked while it was behind"
    assert [r for r in behind.answers if r.error is None], "it never answered once caught up"
    assert all(r.error is None for r in fresh.answers)


async def test_a_projector_that_starts_empty_takes_in_the_snapshot_and_folds_only_what_came_after(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """A projector replica that starts on an empty database (a new replica, a lost disk) reads
    the projectors' snapshot and folds only what the log holds after it, however long the log;
    one of another schema is ignored."""
    machine = StateMachineService(await nats.connect(nats_server.url))
    await machine.start()
    client = SandboxClient(nc, actor="test")
    first = Projector(
        await nats.connect(nats_server.url),
        tmp_path / "a" / "projection.sqlite3",
        snapshot_every=20,
        snapshot_check=0.1,
    )
    second: Projector | None = None
    query: QueryService | None = None
    try:
        for i in range(30):
            await client.create(f"snap-{i}", IMAGE, driver="podman", labels={"n": str(i)})
        await first.start()
        await until(lambda: first.snapshot_at >= 30, "the first projector's snapshot")
        taken = first.snapshot_at
        for i in range(3):  # after the snapshot
            await client.create(f"late-{i}", IMAGE, driver="podman")
        last = client.seen

        # The new replica's query service may open the empty database first, as serve may.
        path = tmp_path / "b" / "projection.sqlite3"
        query = QueryService(await nats.connect(nats_server.url), path)
        await query.start()
        second = Projector(await nats.connect(nats_server.url), path, snapshot_every=10**9)
        folded: list[int] = []
        fold = second._fold

        def counted(seq: int, name: str, data: bytes, changed: dict[str, Any]) -> None:
            folded.append(seq)
            fold(seq, name, data, changed)

        second._fold = counted  # type: ignore[method-assign]
        await second.start()
        await until(lambda: second is not None and second.position >= last, "the second projector caught up")
        assert second.snapshot_at == taken
        assert folded and min(folded) == taken + 1, folded[:5]  # nothing the snapshot held was folded again
        await until(lambda: first.position >= last, "the first projector caught up")
        assert {n: r.values() for n, r in second.rows.items()} == {n: r.values() for n, r in first.rows.items()}
        item = await SandboxClient(nc, actor="reader").get("snap-3")  # a row that came with the snapshot
        assert item["labels"] == {"n": "3"}

        js = nc.jetstream()
        info = await js.stream_info(subjects.LOG_STREAM)
        created = info.created.isoformat() if info.created else ""
        store = await snapshots.projection_store(js)
        assert await snapshots.load_projection(js, store, SCHEMA_VERSION, created, info.state.last_seq) is not None
        assert await snapshots.load_projection(js, store, SCHEMA_VERSION + 1, created, info.state.last_seq) is None
        assert await snapshots.load_projection(js, store, SCHEMA_VERSION, "2000-01-01", info.state.last_seq) is None
    finally:
        for service in (second, first, query):
            if service is not None:
                await service.stop()
                await service.nc.close()
        await machine.stop()
        await machine.nc.close()
