"""A log that cannot store answers ``unavailable``, never ``internal``, nothing is reported
as done that is not in it, and a fact that comes meanwhile waits for it, never given up.

A real nats-server whose JetStream may use only a little file storage: once it is used up,
every append is refused (503, "insufficient resources"), as on a full disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy

from sandboxctl.bus.reading import history
from sandboxctl.bus.streams import MAX_DELIVER
from sandboxctl.events import subjects
from sandboxctl.events.facts import ContainerStarted
from sandboxctl.events.replies import ErrorCode, reply_decoder
from sandboxctl.runtime.embedded import free_port, nats_server_binary
from sandboxctl.services import statemachine
from sandboxctl.services.statemachine import FACTS_CONSUMER, StateMachineService
from sandboxctl.statemachine import Phase
from tests.conftest import until
from tests.integration.test_idempotency import send
from tests.integration.test_statemachines import report


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}", max_file_store: 1MB }}\n'
    )
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def nc(small_server: str) -> AsyncIterator[NATS]:
    for _ in range(100):
        try:
            conn = await nats.connect(small_server, connect_timeout=0.2, allow_reconnect=False)
            break
        except Exception:
            await asyncio.sleep(0.05)
    yield conn
    await conn.close()


async def test_a_full_log_answers_unavailable_and_reports_nothing_it_did_not_store(nc: NATS) -> None:
    machine = StateMachineService(nc, drivers=("podman",))
    await machine.start()
    try:
        labels = {f"k{i}": "v" * 250 for i in range(60)}  # about 16 KB an event: the store fills fast
        accepted: list[str] = []
        refused = None
        for i in range(200):
            body = {
                "type": "sandboxctl.command.create.v1",
                "name": f"fill-{i}",
                "command_id": f"fill-{i}",
                "image": "localhost/sandboxctl-busybox:latest",
                "labels": labels,
            }
            msg = await nc.request(subjects.command("create"), msgspec.json.encode(body), timeout=10)
            reply = reply_decoder.decode(msg.data)
            if reply.accepted:
                accepted.append(f"fill-{i}")
                continue
            refused = reply
            break
        assert refused is not None and refused.error is not None, "the store never filled"
        assert refused.error.code is ErrorCode.UNAVAILABLE, refused.error
        assert "log" in refused.error.message
        # What was accepted is in the log; what was refused is not.
        info = await nc.jetstream().stream_info(subjects.LOG_STREAM, subjects_filter=subjects.LOG_ALL)
        assert sorted(name.rsplit(".", 1)[-1] for name in info.state.subjects or {}) == sorted(accepted)
        assert all(not task.done() for task in machine.tasks)  # and the service is still up
    finally:
        await machine.stop()


async def test_a_fact_that_comes_while_the_log_cannot_store_is_applied_once_it_can(
    nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many times it comes back while the log refuses its events: the server never gives a
    fact up after so many deliveries, and an outcome in doubt is tried again, not acknowledged.
    Otherwise the sandbox would wait in its phase for a fact that is gone."""
    monkeypatch.setattr(statemachine, "UNAVAILABLE_RETRY", 0.1)
    machine = StateMachineService(nc, drivers=("podman",))
    await machine.start()
    js = nc.jetstream()
    try:
        assert (await send(nc, "create", name="late", command_id="c-late")).accepted
        # The log takes no more entries: a full disk, in effect (503, "maximum messages exceeded").
        info = await js.stream_info(subjects.LOG_STREAM)
        config = info.config
        await js.update_stream(dataclasses.replace(config, max_msgs=info.state.messages, discard=DiscardPolicy.NEW))
        await report(nc, "late", ContainerStarted(sandbox_id=machine.states["late"].sandbox_id, incarnation="r1"))

        async def delivered() -> int:
            return (await js.consumer_info(subjects.FACTS_STREAM, FACTS_CONSUMER)).delivered.consumer_seq

        for _ in range(200):
            if await delivered() > 2 * MAX_DELIVER:
                break
            await asyncio.sleep(0.05)
        assert await delivered() > 2 * MAX_DELIVER
        assert machine.states["late"].phase is Phase.PROVISIONING
        await js.update_stream(config)
        await until(lambda: machine.states["late"].phase is Phase.READY, "the fact applied once the log takes it")
        kinds = [e["type"].split(".")[2] for e in await history(js, "late")]
        assert kinds == ["created", "ready"], kinds  # applied once, however many times it came
    finally:
        await machine.stop()
