"""Entries a careless or hostile writer put in the log: every reader skips them the same way,
and the sandbox they were written on stays usable, across restarts.

The log is append-only, so nothing can take a bad entry out again: garbage bytes, an event
that does not fit the sandbox's phase, an event whose envelope names another sandbox than
its subject. Once, one of these made every later command on its sandbox answer
``conflict: kept changing`` for ever (the state machine's position stopped before it while
the log's guard counted it) and dead-lettered its facts.
"""

from __future__ import annotations

import asyncio
import json

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from sandboxctl import audit
from sandboxctl.bus import reading
from sandboxctl.bus.eventlog import decode_fact, last_subject_seq
from sandboxctl.bus.reading import load_states
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, encode, now, type_name
from sandboxctl.events.lifecycle import SandboxStopped, SandboxStopRequested
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from sandboxctl.services.statemachine import StateMachineService
from tests.conftest import CLI

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]


def forged(name: str, event: object, subject_name: str | None = None) -> bytes:
    return encode(
        Envelope(
            id=f"forged-{name}-{type_name(type(event))}",
            type=type_name(type(event)),
            source="someone",
            subject=subject_name or name,
            time=now(),
            data=event,
        )
    )


async def write(js: JetStreamContext, name: str, data: bytes) -> int:
    """Append as anyone with write access to the log could: guarded like a real writer, so the
    entry lands right after the sandbox's last one."""
    expected = await last_subject_seq(js, name)
    ack = await js.publish(subjects.log(name), data, headers={"Nats-Expected-Last-Subject-Sequence": str(expected)})
    return int(ack.seq)


async def positions(plane: ControlPlane, name: str) -> dict[str, int]:
    """Where each reader of the log has ``name``: they must agree with the log itself."""
    js = plane.statemachine.js
    return {
        "log": await last_subject_seq(js, name),
        "statemachine": plane.statemachine.states[name].seq,
        "reaper": plane.reaper.states[name].seq,
        "projection": (await SandboxClient(plane.statemachine.nc).get(name))["last_seq"],
        "snapshot": (await load_states(js))[name].seq,
    }


async def test_bad_entries_are_skipped_by_every_reader_and_the_sandbox_stays_usable(
    config: Config, plane: ControlPlane, client: SandboxClient, cli: CLI, names, image: str
) -> None:
    name, other = names.new("victim"), names.new("other")
    for each in (name, other):
        await client.create(each, image, command=SLEEPER)
        await client.wait_for(each, "Ready")
    js = plane.statemachine.js
    stop_of_other = SandboxStopRequested(sandbox_id=plane.statemachine.states[other].sandbox_id, driver="podman")
    bad = [
        await write(js, name, b"\x00\xff not an event"),
        await write(js, name, forged(name, SandboxStopped(exit_code=0))),  # Ready cannot be Stopped
        await write(js, name, forged(name, stop_of_other, subject_name=other)),  # on name's subject, names other
        # Still Ready, as every reader skipped the entry before: Ready cannot be Stopped. (Had the
        # entry naming another sandbox been folded, this would be a fitting stop of a Stopping one.)
        await write(js, name, forged(name, SandboxStopped(exit_code=1))),
    ]
    # Commands on it are decided and appended as if nothing had happened.
    reply = await client.stop(name, timeout=5)
    assert reply.accepted and reply.appended == 1 and reply.seq > bad[-1]
    await client.wait_for(name, "Stopped", reply.seq, timeout=30)
    assert (await client.get(other))["phase"] == "Ready"  # the entry naming it moved nothing
    reply = await client.start(name)
    await client.wait_for(name, "Ready", reply.seq, timeout=30)
    ours = await positions(plane, name)
    assert len(set(ours.values())) == 1, ours

    # Its facts went through: none was dead-lettered by the state machine.
    assert not [r for r in await client.dead_letters() if r["consumer"] == "sandboxctl-statemachine"]
    # Operators see the entries: history shows each with its error, verify lists them.
    history = await reading.history(js, name)
    flagged = {e["seq"]: e["error"] for e in history if "error" in e}
    assert sorted(flagged) == bad and "unreadable" in flagged[bad[0]] and "names sandbox" in flagged[bad[2]]
    _, violations = await audit.verify(js)
    assert {v.seq for v in violations} == set(bad)
    _, out, err = await cli("audit", "replay")
    assert json.loads(out)["differences"] == [], out + err


async def test_a_restarted_plane_and_a_bulk_reader_skip_them_the_same_way(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    name, fresh = names.new("victim"), names.new("fresh")
    await client.create(name, image, command=SLEEPER)
    await client.wait_for(name, "Ready")
    js = plane.statemachine.js
    await write(js, name, forged(name, SandboxStopped(exit_code=0)))
    await write(js, fresh, b"garbage before the sandbox was ever created")
    await plane.stop()

    again = await ControlPlane(config).start()
    try:
        reply = await client.stop(name, timeout=5)  # was "conflict: kept changing" for ever
        assert reply.accepted and reply.appended == 1
        await client.wait_for(name, "Stopped", reply.seq, timeout=30)
        created = await client.create(fresh, image, command=SLEEPER)  # its subject already holds an entry
        assert created.accepted
        await client.wait_for(fresh, "Ready", created.seq, timeout=30)
        # A state machine reading the log through a reader process folds and skips the same.
        nc = await nats.connect(config.nats_url)
        try:
            bulk = StateMachineService(nc, drivers=("podman", "docker"), bulk_behind=1)
            await bulk.start()
            try:
                assert bulk.states == again.statemachine.states
            finally:
                await bulk.stop()
        finally:
            await nc.close()
        assert len(set((await positions(again, name)).values())) == 1
    finally:
        await again.stop()


async def test_no_request_can_make_a_service_answer_into_the_log(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    """A request names its own reply subject; the services answer only into inboxes, so nobody can
    have them write their answers where a stream keeps them."""
    name = names.new()
    await client.create(name, image, command=SLEEPER)
    await client.wait_for(name, "Ready")
    js = plane.statemachine.js
    sandbox_id = (await client.get(name))["sandbox_id"]
    before = await last_subject_seq(js, name)
    facts_before = (await js.stream_info(subjects.FACTS_STREAM)).state.last_seq
    nc = await nats.connect(config.nats_url)
    try:
        for reply in (subjects.log(name), subjects.fact(name), subjects.fact(name, config.host)):
            await nc.publish(subjects.query("get"), json.dumps({"name": name}).encode(), reply=reply)
            await nc.publish(subjects.query("list"), b"{}", reply=reply)
            stop = {"type": "sandboxctl.command.stop.v1", "name": name, "command_id": f"inj-{len(reply)}"}
            await nc.publish(subjects.command("stop"), json.dumps(stop).encode(), reply=reply)
        await nc.flush()
        await asyncio.sleep(1)
    finally:
        await nc.close()
    assert await last_subject_seq(js, name) == before  # no answer stored, and the stop was not acted on
    # The engine watcher's own report of the start may come after this (seconds late on a loaded
    # machine): whatever came on the sandbox's fact subjects since must be a fact of its own.
    for payload in await facts_since(js, name, facts_before):
        fact = decode_fact(payload).data
        assert getattr(fact, "sandbox_id", None) == sandbox_id, fact
    assert (await client.get(name))["phase"] == "Ready"


async def facts_since(js: JetStreamContext, name: str, after: int) -> list[bytes]:
    """The payloads stored on ``name``'s fact subjects after the facts stream's position ``after``."""
    last = (await js.stream_info(subjects.FACTS_STREAM)).state.last_seq
    payloads = []
    for seq in range(after + 1, last + 1):
        try:
            msg = await js.get_msg(subjects.FACTS_STREAM, seq)
        except NotFoundError:
            continue
        if msg.subject is not None and subjects.name_of(msg.subject) == name:
            payloads.append(msg.data or b"")
    return payloads
