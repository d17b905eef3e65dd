"""A work order the engine takes longer over than JetStream's ack wait is kept in
hand, not delivered again: the driver worker tells the server it is still
working on it (services/worker.py, _keep_alive). Real engines, real
nats-server; the ack wait is shortened so that a stop with a long grace
outlasts it several times over."""

from __future__ import annotations

import asyncio
import time

import pytest

import sandboxctl.services.worker
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from tests.conftest import Engine

ACK_WAIT = 2.0
GRACE = 7.0  # the container ignores SIGTERM, so the engine's stop takes the whole grace


@pytest.mark.timeout(120)
async def test_an_order_that_outlasts_the_ack_wait_is_delivered_once(
    config: Config, engine: Engine, names: list[str], image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandboxctl.services.worker, "WORK_ACK_WAIT", ACK_WAIT)
    plane = await ControlPlane(config).start()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    try:
        name = names.new("slow")  # type: ignore[attr-defined]
        reply = await client.create(name, image, command=["sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
        await client.wait_for(name, "Ready", reply.seq, timeout=60)
        consumer = next(w for w in plane.workers if w.driver.name == engine.name).durable
        js = client.nc.jetstream()
        assert (await js.consumer_info(subjects.LOG_STREAM, consumer)).config.ack_wait == ACK_WAIT
        began = time.monotonic()
        reply = await client.stop(name, timeout=GRACE)
        stopped = asyncio.create_task(client.wait_for(name, "Stopped", reply.seq, timeout=60))
        # The server counts a redelivery only while the message is unacknowledged: look while
        # the stop is in the engine's hands, not after.
        redelivered = 0
        while not stopped.done():
            redelivered = max(redelivered, (await js.consumer_info(subjects.LOG_STREAM, consumer)).num_redelivered)
            await asyncio.sleep(0.25)
        await stopped
        assert time.monotonic() - began >= 2 * ACK_WAIT, "the stop did not outlast the ack wait: nothing was tested"
        assert redelivered == 0, f"{redelivered} orders delivered again while in hand"
    finally:
        await client.close()
        await plane.stop()
