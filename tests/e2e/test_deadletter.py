"""Poison messages in the consumers go to a dead-letter stream that operators can read,
and never block the sandboxes behind them; a bus that cannot store for now is not poison: what
waits on it is tried again until it goes through."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy

from sandboxctl.bus import eventlog
from sandboxctl.bus.streams import MAX_DELIVER
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.lifecycle import SandboxStopRequested
from sandboxctl.runtime.embedded import ControlPlane
from tests.conftest import CLI


async def test_an_unreadable_fact_and_log_entry_are_dead_lettered_and_nothing_waits_behind_them(
    plane: ControlPlane, cli: CLI, client: SandboxClient, names, image: str
) -> None:
    js = plane.statemachine.js
    poisoned = names.new("poison")
    await js.publish(subjects.fact(poisoned), b"\x00 not a fact", headers={"Nats-Msg-Id": "poison-fact"})
    await js.publish(
        subjects.log(poisoned), b'{"type": "sandboxctl.sandbox.nope.v7"}', headers={"Nats-Msg-Id": "poison-log"}
    )
    # The sandboxes behind the poison carry on.
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready", timeout=20)
    records: list[dict[str, object]] = []
    for _ in range(100):
        records = await client.dead_letters()
        if len(records) >= 3:
            break
        await asyncio.sleep(0.1)
    by_consumer = {r["consumer"]: r for r in records}
    # Every driver worker reads the log, so each one reports the unreadable entry it skipped.
    assert set(by_consumer) == {"sandboxctl-statemachine", "sandboxctl-driver-podman", "sandboxctl-driver-docker"}
    fact = by_consumer["sandboxctl-statemachine"]
    assert fact["subject"] == subjects.fact(poisoned) and str(fact["reason"]).startswith("unreadable fact")
    assert "not a fact" in str(fact["payload"])
    entry = by_consumer["sandboxctl-driver-podman"]
    assert entry["subject"] == subjects.log(poisoned) and "unreadable log entry" in str(entry["reason"])
    code, out, err = await cli("deadletters", "-o", "json")
    assert code == 0 and len(json.loads(out)) == 3, err
    # Delivered once each: terminated, not redelivered (the engine watcher's facts of the sandbox
    # created above may still be in hand for a moment).
    for _ in range(100):
        info = await js.consumer_info(subjects.FACTS_STREAM, "sandboxctl-statemachine")
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.1)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_a_work_order_whose_facts_the_bus_cannot_store_is_worked_again_until_they_go_through(
    plane: ControlPlane, client: SandboxClient, names, image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine stopped the container, but the facts stream takes nothing (a full disk, in
    effect) for longer than MAX_DELIVER deliveries of the order: the order is neither
    dead-lettered nor dropped, the engine watcher's report of the exit waits too, and the stop
    completes once the stream takes facts again. Otherwise the sandbox would wait in Stopping."""
    monkeypatch.setattr(eventlog, "RETRY_DELAYS", (0.1, 0.2, 0.3, 0.5))
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready", timeout=30)
    js = plane.statemachine.js
    worker = next(w for w in plane.workers if w.driver.name == "podman")
    info = await js.stream_info(subjects.FACTS_STREAM)
    config = info.config
    await js.update_stream(dataclasses.replace(config, max_msgs=info.state.messages, discard=DiscardPolicy.NEW))
    try:
        before = (await js.consumer_info(subjects.LOG_STREAM, worker.durable)).delivered.consumer_seq
        reply = await client.stop(name, timeout=1)
        for _ in range(300):
            delivered = (await js.consumer_info(subjects.LOG_STREAM, worker.durable)).delivered.consumer_seq
            if delivered - before > 2 * MAX_DELIVER:
                break
            await asyncio.sleep(0.05)
        assert delivered - before > 2 * MAX_DELIVER, "the order was not delivered again and again"
        assert (await client.get(name))["phase"] == "Stopping"
        # The engine fails the order once by itself: its first failure of its own, however many
        # deliveries the outage made, is tried again, and goes through once the bus takes facts.
        perform, hiccups = worker.perform, []

        async def hiccup(envelope: Envelope) -> Any:
            if envelope.subject == name and not hiccups:
                hiccups.append(envelope.id)
                raise RuntimeError("the engine hiccuped")
            return await perform(envelope)

        monkeypatch.setattr(worker, "perform", hiccup)
        for _ in range(200):  # failed once by itself while the bus still takes nothing
            if hiccups:
                break
            await asyncio.sleep(0.05)
        assert hiccups, "the order did not come again"
    finally:
        await js.update_stream(config)
    await client.wait_for(name, "Stopped", reply.seq, timeout=30)
    # The engine watcher's report of the exit may settle the phase before the order comes again;
    # the order still comes, fails once by itself, and is worked to the end, never dropped.
    for _ in range(200):
        pending = (await js.consumer_info(subjects.LOG_STREAM, worker.durable)).num_ack_pending
        if hiccups and not pending:
            break
        await asyncio.sleep(0.05)
    assert hiccups and not pending, (hiccups, pending)
    assert (await client.get(name))["phase"] == "Stopped"
    assert not [r for r in await client.dead_letters() if r["subject"] == subjects.log(name)]


async def test_an_order_that_cannot_be_settled_leaves_no_order_queued_behind_it_stranded(
    plane: ControlPlane, client: SandboxClient, names, image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log cannot be read for a stop order (a read timing out in an outage) while a second
    stop, with a shorter grace, waits behind it in the sandbox's queue: the first comes again
    later, and the second is worked meanwhile. An error escaping the first had ended the sandbox's
    queue, leaving the second in hand, kept alive and never worked, the sandbox in Stopping."""
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready", timeout=30)
    worker = next(w for w in plane.workers if w.driver.name == "podman")
    superseded, failed = worker._superseded, []

    async def unreadable(msg: Msg, envelope: Envelope) -> bool:
        if envelope.subject == name and envelope.type == SandboxStopRequested.TYPE and not failed:
            failed.append(envelope.id)
            for _ in range(200):  # until the second stop waits behind this one
                queue = worker._queues.get(name)
                if queue is not None and queue.qsize():
                    break
                await asyncio.sleep(0.05)
            raise nats.errors.TimeoutError
        return await superseded(msg, envelope)

    monkeypatch.setattr(worker, "_superseded", unreadable)
    await client.stop(name, timeout=60)
    second = await client.stop(name, timeout=1)
    assert second.appended, second
    await client.wait_for(name, "Stopped", second.seq, timeout=20)
    assert failed
