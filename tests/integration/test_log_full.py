"""A log that cannot store answers ``unavailable``, never ``internal``, and nothing is reported
as done that is not in it.

A real nats-server whose JetStream may use only a little file storage: once it is used up,
every append is refused (503, "insufficient resources"), as on a full disk.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from sandboxctl.events import subjects
from sandboxctl.events.replies import ErrorCode, reply_decoder
from sandboxctl.runtime.embedded import free_port, nats_server_binary
from sandboxctl.services.statemachine import StateMachineService


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
