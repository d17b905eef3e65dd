"""A wait ends on the projector's notice, sent while the row it announces commits, and what the
wait returned is what the same client reads next, from the query service, however late the commit.

A real projector and query service over a real nats-server, with the events written straight into
the log (what the state machine would append); the projector's write of the last event is held
until the test lets it go, so the order of notice and commit is the test's to choose.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from sandboxctl.bus.streams import ensure_streams
from sandboxctl.client import SandboxClient, WaitTimeout
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, encode, new_id, now
from sandboxctl.events.lifecycle import LifecycleEvent, SandboxCreated, SandboxReady
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer
from sandboxctl.services import projection
from sandboxctl.statemachine import Phase
from tests.conftest import until

IMAGE = "localhost/sandboxctl-busybox:latest"


@pytest.fixture
async def readers(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[ControlPlane, NATS, SandboxClient]]:
    config = Config(nats_url=nats_server.url, data_dir=tmp_path / "data", run_dir=tmp_path / "run", actor="test")
    nc = await nats.connect(config.nats_url)
    await ensure_streams(nc.jetstream())
    plane = await ControlPlane(config, components=("projector", "query")).start()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    try:
        await asyncio.wait_for(plane.projector.caught_up.wait(), 60)
        yield plane, nc, client
    finally:
        await client.close()
        await plane.stop()
        await nc.close()


async def append(nc: NATS, name: str, event: LifecycleEvent) -> int:
    envelope = Envelope(id=new_id(), type=event.TYPE, source="test", subject=name, time=now(), data=event, actor="test")
    ack = await nc.jetstream().publish(subjects.log(name), encode(envelope), stream=subjects.LOG_STREAM)
    return int(ack.seq)


def hold_writes_from(plane: ControlPlane, seq: int) -> asyncio.Event:
    """Hold the projector's writes of log positions from ``seq`` on until the event returned is set."""
    projector = plane.projector
    submit: Callable[[list[tuple[object, ...]], int], Awaitable[None]] = projector._submit
    gate = asyncio.Event()

    async def held(upserts: list[tuple[object, ...]], last: int) -> None:
        if last >= seq:
            await gate.wait()
        await submit(upserts, last)

    projector._submit = lambda upserts, last: asyncio.ensure_future(held(upserts, last))  # type: ignore[method-assign]
    return gate


async def created_then_held(plane: ControlPlane, nc: NATS, name: str) -> asyncio.Event:
    """A sandbox Provisioning, its row committed; the write of whatever comes next, held."""
    seq = await append(nc, name, SandboxCreated(sandbox_id=new_id(), image=IMAGE, driver="podman"))
    await until(lambda: plane.projector.position >= seq, "the Provisioning row committed")
    return hold_writes_from(plane, seq + 1)


async def test_a_wait_ends_on_the_notice_and_the_clients_next_get_waits_for_the_commit(
    readers: tuple[ControlPlane, NATS, SandboxClient],
) -> None:
    plane, nc, client = readers
    gate = await created_then_held(plane, nc, "w1")
    waiting = asyncio.create_task(client.wait_for("w1", Phase.READY, timeout=20))
    await asyncio.sleep(0.2)  # the wait has read the row as it is (Provisioning) and listens
    ready_seq = await append(nc, "w1", SandboxReady(incarnation="run-1"))

    row = await asyncio.wait_for(waiting, 10)  # its write still held: the notice alone ended the wait
    assert (row["phase"], row["last_seq"]) == ("Ready", ready_seq)
    assert plane.projector.position < ready_seq

    # The client's next read shows no less than its wait did: the query waits for the commit.
    reading = asyncio.create_task(client.get("w1"))
    await asyncio.sleep(0.2)
    assert not reading.done()
    gate.set()
    got = await asyncio.wait_for(reading, 10)
    assert (got["phase"], got["last_seq"]) == ("Ready", ready_seq)


async def test_a_notice_too_large_to_carry_its_row_is_read_back_no_older_than_it(
    readers: tuple[ControlPlane, NATS, SandboxClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the notice leaves the row out, the wait reads it back asking for at least the notice's
    position: it never takes the row as it was before for an answer."""
    plane, nc, client = readers
    monkeypatch.setattr(projection, "NOTICE_MAX", 64)  # every notice without its row
    gate = await created_then_held(plane, nc, "w2")
    seen: list[tuple[str, int]] = []

    def on_change(item: dict[str, Any]) -> None:
        seen.append((item["phase"], item["last_seq"]))

    waiting = asyncio.create_task(client.wait_for("w2", Phase.READY, timeout=20, on_change=on_change))
    await asyncio.sleep(0.2)
    ready_seq = await append(nc, "w2", SandboxReady(incarnation="run-1"))
    await asyncio.sleep(0.3)  # the notice has come; the row's write is still held
    assert not waiting.done()
    gate.set()
    row = await asyncio.wait_for(waiting, 10)
    assert (row["phase"], row["last_seq"]) == ("Ready", ready_seq)
    assert seen == [("Provisioning", ready_seq - 1), ("Ready", ready_seq)]


async def test_a_late_notice_of_an_older_row_never_takes_a_wait_back(
    readers: tuple[ControlPlane, NATS, SandboxClient],
) -> None:
    """Each projector replica sends its own notices: one behind sends the row as it was, after a
    newer one was seen. The wait shows the newer row alone, and the client reads no older."""
    plane, nc, client = readers
    provisioning = await append(nc, "w3", SandboxCreated(sandbox_id=new_id(), image=IMAGE, driver="podman"))
    ready = await append(nc, "w3", SandboxReady(incarnation="run-1"))
    await until(lambda: plane.projector.position >= ready, "the Ready row committed")
    row = await client.get("w3")
    shown: list[tuple[str, int]] = []

    def on_change(item: dict[str, Any]) -> None:
        shown.append((item["phase"], item["last_seq"]))

    waiting = asyncio.create_task(client.wait_for("w3", Phase.STOPPED, timeout=1.5, on_change=on_change))
    await until(lambda: shown, "the row read by the wait")
    behind = {**row, "phase": "Provisioning", "last_seq": provisioning}  # a replica that is behind
    notice = {"name": "w3", "phase": "Provisioning", "seq": provisioning, "item": behind}
    await nc.publish(subjects.projected("w3"), json.dumps(notice).encode())
    with pytest.raises(WaitTimeout):
        await waiting
    assert set(shown) == {("Ready", ready)}  # (looked at again each second)
    assert client.seen >= ready
