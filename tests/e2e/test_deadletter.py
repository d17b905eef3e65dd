"""Poison messages in the consumers go to a dead-letter stream that operators can read,
and never block the sandboxes behind them."""

from __future__ import annotations

import asyncio
import json

from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
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
