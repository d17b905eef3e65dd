"""SandboxClient as another service uses it: typed errors, safe retries, waits that end when they
cannot end well, outcomes it cannot know said as such, event subscriptions."""

from __future__ import annotations

import asyncio
import json
import math
import time

import nats
import pytest
from nats.aio.msg import Msg

from sandboxctl.cli.main import EXIT_CODES
from sandboxctl.client import (
    ERRORS,
    EXIT_STATUS,
    AlreadyExists,
    ClientCode,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PhaseFailed,
    SandboxClient,
    SandboxError,
    Unavailable,
    wait_verdict,
)
from sandboxctl.events import subjects
from sandboxctl.events.envelope import encode
from sandboxctl.events.limits import GRACE_MAX, LABELS_MAX
from sandboxctl.events.replies import ErrorCode, error_reply
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from sandboxctl.statemachine import Phase


async def test_each_error_code_raises_its_own_type(client: SandboxClient, names, image: str) -> None:
    name = names.new()
    with pytest.raises(InvalidArgument):
        await client.create("", image)
    with pytest.raises(NotFound):
        await client.stop("never-made")
    await client.create(name, image)
    with pytest.raises(AlreadyExists) as caught:
        await client.create(name, image)
    assert caught.value.code == "already_exists" and isinstance(caught.value, SandboxError)
    with pytest.raises(FailedPrecondition, match="is Provisioning; stop is allowed in Ready"):
        await client.stop(name)


async def test_a_retry_with_the_same_command_id_applies_once_even_across_an_outage(
    config: Config, names, image: str
) -> None:
    client = await SandboxClient.connect(config.nats_url, actor="test")
    client.request_timeout, client.retries = 0.5, 8
    name = names.new()
    plane_task = None
    try:
        # No service is up yet: the client keeps retrying the same command id until one answers.
        async def late_plane() -> ControlPlane:
            await asyncio.sleep(0.5)
            return await ControlPlane(config).start()

        plane_task = asyncio.create_task(late_plane())
        first = await client.create(name, image, command_id="retry-me")
        again = await client.create(name, image, command_id="retry-me")
        assert first.accepted and again.accepted  # the retry is answered, and applied once (below)
        await client.wait_for(name, "Ready")
        history = await client.history(name)
        assert [e["type"] for e in history].count("sandboxctl.sandbox.created.v1") == 1
    finally:
        await client.close()
        if plane_task is not None:
            await (await plane_task).stop()


async def test_no_service_at_all_is_unavailable(config: Config) -> None:
    client = await SandboxClient.connect(config.nats_url, actor="test")
    client.request_timeout, client.retries = 0.2, 1
    try:
        with pytest.raises(Unavailable):
            await client.stop("anything")
    finally:
        await client.close()


async def test_subscribe_to_one_sandboxs_events(client: SandboxClient, names, image: str) -> None:
    a, b = names.new(), names.new()
    await client.create(a, image)
    await client.create(b, image)
    seen: list[str] = []

    async def follow() -> None:
        async for _, envelope in client.events(a):
            seen.append(envelope.type.split(".")[2])
            if seen[-1] == "stopped":
                return

    follower = asyncio.create_task(follow())
    await client.wait_for(a, "Ready")
    reply = await client.stop(a)
    await asyncio.wait_for(follower, 10)
    assert seen == ["created", "ready", "stop_requested", "stopped"]
    past = [e.subject async for _, e in client.events(a, since_seq=reply.seq, follow=False)]
    assert past and set(past) == {a}


SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]


async def test_a_wait_for_ready_ends_at_once_when_a_delete_overtakes_the_start(
    client: SandboxClient, names, image: str
) -> None:
    """The issue's race: a start, then a delete before it is Ready. The wait cannot end well, so it
    ends as soon as the delete is seen, naming the phase, not after its whole timeout."""
    name = names.new()
    await client.create(name, image, command=SLEEPER)
    await client.wait_for(name, Phase.READY)
    await client.wait_for(name, Phase.STOPPED, (await client.stop(name, timeout=1)).seq)
    start = await client.start(name)
    deleted = await client.delete(name)
    assert deleted.seq > start.seq
    began = time.monotonic()
    with pytest.raises(FailedPrecondition, match=rf"sandbox {name} is Delet(ing|ed) .*so it will not become Ready"):
        await client.wait_for(name, Phase.READY, start.seq, timeout=60)
    assert time.monotonic() - began < 10
    assert (await client.wait_for(name, Phase.DELETED, deleted.seq, timeout=60))["phase"] == Phase.DELETED


def row(phase: Phase, seq: int, **fields: object) -> dict[str, object]:
    return {"name": "box", "phase": phase.value, "last_seq": seq, "last_error": "", **fields}


def test_a_wait_ends_when_its_phase_can_no_longer_come() -> None:
    """Every phase a wait can meet after its command (seq 10), for each phase a command waits for."""
    cases: list[tuple[Phase, Phase, bool | type[SandboxError]]] = [
        # waiting for Ready (create, start): on the way from Provisioning and Starting only
        (Phase.READY, Phase.READY, True),
        (Phase.READY, Phase.PROVISIONING, False),
        (Phase.READY, Phase.STARTING, False),
        (Phase.READY, Phase.ERROR, PhaseFailed),
        (Phase.READY, Phase.STOPPING, FailedPrecondition),
        (Phase.READY, Phase.STOPPED, FailedPrecondition),
        (Phase.READY, Phase.DELETING, FailedPrecondition),
        (Phase.READY, Phase.DELETED, FailedPrecondition),
        # waiting for Stopped: on the way from Stopping (a second stop keeps it there) only
        (Phase.STOPPED, Phase.STOPPED, True),
        (Phase.STOPPED, Phase.STOPPING, False),
        (Phase.STOPPED, Phase.ERROR, PhaseFailed),
        (Phase.STOPPED, Phase.STARTING, FailedPrecondition),
        (Phase.STOPPED, Phase.READY, FailedPrecondition),
        (Phase.STOPPED, Phase.DELETING, FailedPrecondition),
        (Phase.STOPPED, Phase.DELETED, FailedPrecondition),
        (Phase.STOPPED, Phase.PROVISIONING, FailedPrecondition),
        # waiting for Deleted: on the way from Deleting only
        (Phase.DELETED, Phase.DELETED, True),
        (Phase.DELETED, Phase.DELETING, False),
        (Phase.DELETED, Phase.ERROR, PhaseFailed),
        (Phase.DELETED, Phase.PROVISIONING, FailedPrecondition),  # unless the log shows it was deleted first
    ]
    for target, seen, expected in cases:
        verdict = wait_verdict("box", target, 10, row(seen, 11))
        if isinstance(expected, bool):
            assert verdict is expected, (target, seen, verdict)
        else:
            assert isinstance(verdict, expected), (target, seen, verdict)
            named = f"sandbox box is {seen}" if seen is Phase.ERROR else f"sandbox box is {seen} (log seq 11"
            assert verdict.message.startswith(named), verdict.message
            assert seen is Phase.ERROR or f"so it will not become {target}" in verdict.message, verdict.message
    # A row from before the command, at the point named (a start by hand may follow a Stopped
    # sandbox's own event), or no row yet, or no position given: keep waiting.
    assert wait_verdict("box", Phase.READY, 10, row(Phase.STOPPED, 9)) is False
    assert wait_verdict("box", Phase.READY, 10, row(Phase.STOPPED, 10)) is False
    assert wait_verdict("box", Phase.READY, 10, None) is False
    assert wait_verdict("box", Phase.READY, 0, row(Phase.STOPPED, 9)) is False
    assert wait_verdict("box", Phase.READY, 0, row(Phase.DELETED, 9)) is False
    assert isinstance(wait_verdict("box", Phase.READY, 0, row(Phase.ERROR, 9, last_error="x")), PhaseFailed)


async def test_a_command_whose_answer_is_lost_is_outcome_unknown_and_may_well_be_applied(
    config: Config, plane: ControlPlane, names, image: str
) -> None:
    """The issue's creates: accepted, but the answer never reached the client. It must not say
    ``unavailable`` (nothing done): it says the outcome is unknown and gives the command id."""
    hasty = await SandboxClient.connect(config.nats_url, actor="test")
    hasty.request_timeout, hasty.retries = 0.0005, 0  # the state machine answers long after this
    name = names.new()
    try:
        with pytest.raises(OutcomeUnknown) as caught:
            await hasty.create(name, image, command=SLEEPER, command_id="lost-answer-1")
        assert caught.value.code == "outcome_unknown" and caught.value.command_id == "lost-answer-1"
        assert "may have been accepted" in caught.value.message and f"sandboxctl history {name}" in (
            caught.value.message
        )
        hasty.request_timeout = 10.0
        assert (await hasty.wait_for(name, Phase.READY, timeout=60))["phase"] == "Ready"  # it was applied
        assert {e["causationid"] for e in await hasty.history(name)} >= {"lost-answer-1"}
    finally:
        await hasty.close()


async def test_a_command_sent_once_unanswered_stays_outcome_unknown_when_no_one_answers_after(
    config: Config,
) -> None:
    """A first attempt that went out and timed out may have been applied, whatever the retries see
    later (here: no responders, which alone would mean nothing was done)."""
    nc = await nats.connect(config.nats_url)
    got: list[bytes] = []

    async def swallow(msg: Msg) -> None:  # a state machine that dies before it answers
        got.append(msg.data)
        await sub.unsubscribe()

    sub = await nc.subscribe(subjects.command("stop"), cb=swallow)
    await nc.flush()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    client.request_timeout, client.retries = 0.3, 2
    try:
        with pytest.raises(OutcomeUnknown, match="command id is c-1"):
            await client.stop("box", command_id="c-1")
        assert len(got) == 1
        with pytest.raises(Unavailable) as caught:  # and when no attempt reached anyone: nothing was done
            await client.stop("box", command_id="c-2")
        assert not isinstance(caught.value, OutcomeUnknown) and "no service answers" in caught.value.message
    finally:
        await client.close()
        await nc.close()


async def test_an_unavailable_reply_is_unavailable_with_its_reason_after_a_bounded_retry(config: Config) -> None:
    """The state machine answers ``unavailable`` when it cannot write the log: the client keeps
    the reason, retries within its usual budget (same command id), and says Unavailable."""
    nc = await nats.connect(config.nats_url)
    seen: list[str] = []

    async def log_is_down(msg: Msg) -> None:
        seen.append(json.loads(msg.data)["command_id"])
        await msg.respond(encode(error_reply(ErrorCode.UNAVAILABLE, "the log cannot be written: disk full", "box")))

    await nc.subscribe(subjects.command("start"), cb=log_is_down)
    await nc.flush()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    client.retries = 2
    try:
        began = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await client.start("box", command_id="c-9")
        assert type(caught.value) is Unavailable and caught.value.code == ErrorCode.UNAVAILABLE
        assert caught.value.message == "the log cannot be written: disk full"
        assert seen == ["c-9"] * 3 and time.monotonic() - began < 2
    finally:
        await client.close()
        await nc.close()


async def test_a_command_outside_the_bounds_is_refused_before_it_is_sent(config: Config) -> None:
    client = await SandboxClient.connect(config.nats_url, actor="test")
    client.retries = 0
    try:
        for attempt in (
            client.stop("box", timeout=GRACE_MAX + 1),
            client.stop("box", timeout=math.nan),
            client.create("box", "img", labels={f"k{i}": "v" for i in range(LABELS_MAX + 1)}),
            client.acquire_lease("box", "me", ttl=-1),
        ):
            with pytest.raises(InvalidArgument):  # no service runs: had it been sent, it would be Unavailable
                await attempt
    finally:
        await client.close()


def test_every_error_code_has_its_type_and_its_own_exit_status() -> None:
    """One table: each code a service (ErrorCode) or the client (ClientCode) reports has an exception
    type and an exit status, and the CLI's table is that one."""
    codes = {str(c) for c in ErrorCode} | {str(c) for c in ClientCode}
    assert codes == set(EXIT_STATUS) == {cls.code for cls in ERRORS}
    assert len(set(EXIT_STATUS.values())) == len(EXIT_STATUS) and 0 not in EXIT_STATUS.values()
    assert EXIT_CODES == {**EXIT_STATUS, "broken_pipe": 141}  # the CLI's own code beside the client's
    for code in codes:
        error = SandboxError.of(code, "m")
        assert error.code == code and type(error).exit_status == EXIT_STATUS[code]
