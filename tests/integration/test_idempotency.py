"""An idempotency key is bound to its command, and only documented subjects command.

A command id seen in the last two minutes used to be dropped by JetStream's duplicate
window and answered "accepted, appended: 1" even when it came with another command (a
create of another name, a start after a stop): nothing was stored, yet it was reported as
done. These tests send what another service could send, with plain requests, against a
real nats-server and the state machine alone (no engine is needed to decide).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NATS

from sandboxctl.bus.eventlog import append, last_subject_seq
from sandboxctl.bus.reading import history
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, now, type_name
from sandboxctl.events.lifecycle import SandboxReady, SandboxStopped
from sandboxctl.events.replies import Reply, reply_decoder
from sandboxctl.services.statemachine import StateMachineService


@pytest.fixture
async def machine(nc: NATS) -> AsyncIterator[StateMachineService]:
    service = StateMachineService(nc, drivers=("podman",))
    await service.start()
    yield service
    await service.stop()


async def send(nc: NATS, verb: str, subject: str | None = None, **fields: object) -> Reply:
    body = {"type": f"sandboxctl.command.{verb}.v1", "actor": "another-service", **fields}
    if verb == "create":
        body.setdefault("image", "localhost/sandboxctl-busybox:latest")
    msg = await nc.request(subject or subjects.command(verb), msgspec.json.encode(body), timeout=5)
    return reply_decoder.decode(msg.data)


async def types(nc: NATS, name: str) -> list[str]:
    return [e["type"].split(".")[2] for e in await history(nc.jetstream(), name)]


async def test_the_same_id_with_the_same_command_gets_its_first_outcome_and_with_another_is_refused(
    nc: NATS, machine: StateMachineService
) -> None:
    first = await send(nc, "create", name="alpha", command_id="k-1")
    assert first.accepted and first.appended == 1 and first.sandbox == "alpha"
    assert await send(nc, "create", name="alpha", command_id="k-1") == first  # a retry: the first outcome
    reused = await send(nc, "create", name="beta", command_id="k-1")  # another command, the same key
    assert not reused.accepted and reused.error is not None and reused.error.code == "invalid_argument"
    assert "k-1" in reused.error.message and "alpha" in reused.error.message
    assert await types(nc, "beta") == []  # nothing stored, nothing reported as done
    assert await types(nc, "alpha") == ["created"]


async def test_a_reused_id_is_refused_after_a_restart_too_and_nothing_is_appended(
    nc: NATS, machine: StateMachineService
) -> None:
    """After a restart the state machine learns the recent outcomes again from the log (each
    command's events carry its digest): a retry gets its first outcome, a reused key is refused."""
    first = await send(nc, "create", name="gamma", command_id="c-gamma")
    await machine.stop()
    again = StateMachineService(nc, drivers=("podman",))
    await again.start()
    try:
        other = await send(nc, "create", name="delta", command_id="c-gamma")
        assert other.error is not None and other.error.code == "invalid_argument", other
        assert await types(nc, "delta") == []
        retry = await send(nc, "create", name="gamma", command_id="c-gamma")
        assert retry == first
        assert await types(nc, "gamma") == ["created"]
    finally:
        await again.stop()


async def test_a_start_sent_with_the_id_of_a_stop_is_refused_before_and_after_a_restart(
    nc: NATS, machine: StateMachineService
) -> None:
    await send(nc, "create", name="eps", command_id="c-eps")
    # What the driver's facts would make of it: Ready, then (after the stop) Stopped.
    await logged(nc, "eps", SandboxReady(incarnation="2026-12-01T00:00:00Z"))
    stop = await send(nc, "stop", name="eps", command_id="op-1")
    assert stop.accepted and stop.appended == 1 and stop.phase == "Stopping"
    await logged(nc, "eps", SandboxStopped(exit_code=0))
    await until_folded(machine, "eps")
    start = await send(nc, "start", name="eps", command_id="op-1")
    assert start.error is not None and start.error.code == "invalid_argument", start
    await machine.stop()
    again = StateMachineService(nc, drivers=("podman",))
    await again.start()
    try:
        start = await send(nc, "start", name="eps", command_id="op-1")
        assert start.error is not None and start.error.code == "invalid_argument", start
    finally:
        await again.stop()
    assert await types(nc, "eps") == ["created", "ready", "stop_requested", "stopped"]


async def logged(nc: NATS, name: str, event: object) -> None:
    envelope = Envelope(
        id=f"{name}-{type_name(type(event))}",
        type=type_name(type(event)),
        source="t",
        subject=name,
        time=now(),
        data=event,
    )
    await append(nc.jetstream(), envelope, await last_subject_seq(nc.jetstream(), name))


async def until_folded(machine: StateMachineService, name: str) -> None:
    seq = await last_subject_seq(machine.js, name)
    for _ in range(500):
        if machine.states[name].seq >= seq:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the state machine did not fold {name} up to {seq}")


@pytest.mark.parametrize(
    "subject", ["sandboxctl.cmd.x.stop", "sandboxctl.cmd.stop.someone", "sandboxctl.cmd.stop.a.b", "sandboxctl.cmd.y"]
)
async def test_only_the_documented_subjects_command(nc: NATS, machine: StateMachineService, subject: str) -> None:
    await send(nc, "create", name="zeta", command_id="c-zeta")
    reply = await send(nc, "stop", subject=subject, name="zeta", command_id=f"stop-{subject}")
    assert reply.error is not None and reply.error.code == "invalid_argument", reply
    assert "sandboxctl.cmd.stop" in reply.error.message
    assert await types(nc, "zeta") == ["created"]


async def test_a_huge_command_id_is_invalid_not_internal(nc: NATS, machine: StateMachineService) -> None:
    reply = await send(nc, "stop", name="zeta", command_id="x" * (900 * 1024))
    assert reply.error is not None and reply.error.code == "invalid_argument", reply.error
