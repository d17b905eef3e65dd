"""SandboxClient as another service uses it, against the whole plane on real engines: typed
errors, safe retries, waits that end when they cannot end well, an outcome it cannot know said as
such, event subscriptions. The client's own rules are tests/unit/test_client.py; against a
nats-server with no plane, tests/integration/test_client.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from sandboxctl.client import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    SandboxClient,
    SandboxError,
)
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
