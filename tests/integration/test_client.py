"""SandboxClient against a real nats-server with no sandboxctl service, or with a stand-in that
answers as one would in trouble: nothing answers, an answer never comes, the log cannot be
written, a command outside the bounds. The client against the whole plane on real engines is
tests/e2e/test_client.py."""

from __future__ import annotations

import json
import math
import time

import nats
import pytest
from nats.aio.msg import Msg

from sandboxctl.client import InvalidArgument, OutcomeUnknown, SandboxClient, Unavailable
from sandboxctl.events import subjects
from sandboxctl.events.envelope import encode
from sandboxctl.events.limits import GRACE_MAX, LABELS_MAX
from sandboxctl.events.replies import ErrorCode, error_reply
from sandboxctl.runtime.embedded import NatsServer


async def test_no_service_at_all_is_unavailable(nats_server: NatsServer) -> None:
    client = await SandboxClient.connect(nats_server.url, actor="test")
    client.request_timeout, client.retries = 0.2, 1
    try:
        with pytest.raises(Unavailable):
            await client.stop("anything")
    finally:
        await client.close()


async def test_a_command_sent_once_unanswered_stays_outcome_unknown_when_no_one_answers_after(
    nats_server: NatsServer,
) -> None:
    """A first attempt that went out and timed out may have been applied, whatever the retries see
    later (here: no responders, which alone would mean nothing was done)."""
    nc = await nats.connect(nats_server.url)
    got: list[bytes] = []

    async def swallow(msg: Msg) -> None:  # a state machine that dies before it answers
        got.append(msg.data)
        await sub.unsubscribe()

    sub = await nc.subscribe(subjects.command("stop"), cb=swallow)
    await nc.flush()
    client = await SandboxClient.connect(nats_server.url, actor="test")
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


async def test_an_unavailable_reply_is_unavailable_with_its_reason_after_a_bounded_retry(
    nats_server: NatsServer,
) -> None:
    """The state machine answers ``unavailable`` when it cannot write the log: the client keeps
    the reason, retries within its usual budget (same command id), and says Unavailable."""
    nc = await nats.connect(nats_server.url)
    seen: list[str] = []

    async def log_is_down(msg: Msg) -> None:
        seen.append(json.loads(msg.data)["command_id"])
        await msg.respond(encode(error_reply(ErrorCode.UNAVAILABLE, "the log cannot be written: disk full", "box")))

    await nc.subscribe(subjects.command("start"), cb=log_is_down)
    await nc.flush()
    client = await SandboxClient.connect(nats_server.url, actor="test")
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


async def test_a_command_outside_the_bounds_is_refused_before_it_is_sent(nats_server: NatsServer) -> None:
    client = await SandboxClient.connect(nats_server.url, actor="test")
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
