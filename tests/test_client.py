"""SandboxClient as another service uses it: typed errors, safe retries, event subscriptions."""

from __future__ import annotations

import asyncio

import pytest

from services.client import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SandboxClient,
    SandboxError,
    Unavailable,
)
from services.config import Config
from services.embedded import ControlPlane


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
        assert first.accepted and again.accepted and again.appended == 0
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
