"""Idle auto-stop, leases, touch and stop holds on a real nats-server and real podman, with
idle timeouts of a second or two and a one-second grace period.

The reaper runs in the control plane as ``sandboxctl up`` runs it; the restart test
starts reapers of its own beside it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
import pytest

from sandboxctl.bus.lease import LEASE_TTL
from sandboxctl.client import FailedPrecondition, PermissionDenied, SandboxClient
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer
from sandboxctl.services.reaper import Reaper
from tests.authkit import auth_config, make_store, role_clients
from tests.conftest import CLI, Engine
from tests.logview import kinds, settled

GRACE = 1.0


@pytest.fixture
def config(config: Config) -> Config:
    config.idle_grace = GRACE
    config.reaper_interval = 0.1
    return config


def idle_stops(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [h for h in history if h["type"].endswith("stop_requested.v1") and h["data"].get("reason") == "idle"]


async def log_of(client: SandboxClient, name: str) -> list[tuple[int, Any]]:
    return [(seq, env) async for seq, env in client.events(name, follow=False)]


async def wait_for_event(client: SandboxClient, name: str, kind: str, timeout: float = 10.0) -> Any:
    async def first() -> Any:
        async for _, envelope in client.events(name, follow=True):
            if envelope.type.split(".")[2] == kind:
                return envelope
        return None

    return await asyncio.wait_for(first(), timeout)


async def test_an_idle_sandbox_is_stopped_not_deleted_and_its_workspace_survives(
    cli: CLI, client: SandboxClient, names, image: str, engines: dict[str, Engine]
) -> None:
    podman = engines["podman"]
    name = names.new("idle")
    code, _, err = await cli("create", name, "--image", image, "--idle-timeout", "2s")
    assert code == 0, err
    code, _, err = await cli("exec", name, "--", "sh", "-c", "echo 'agent work' > /workspace/notes.txt")
    assert code == 0, err
    began = time.monotonic()

    item = await client.wait_for(name, "Stopped", timeout=20)
    waited = time.monotonic() - began
    assert 2 + GRACE - 0.3 <= waited < 12, waited  # not before its timeout and grace, not much after
    assert item["idle_timeout"] == 2 and item["warning"] is None
    history = await client.history(name)
    (stop,) = idle_stops(history)
    assert stop["actor"] == "sandboxctl/reaper"
    warning = history[kinds(history).index("stop_warning")]
    assert warning["actor"] == "sandboxctl/reaper" and warning["data"]["grace"] == GRACE
    assert warning["seq"] < stop["seq"]
    code, out, _ = await cli("history", name)
    assert code == 0 and "stop_requested" in out and "idle" in out and "sandboxctl/reaper" in out

    # stopped, never deleted: container and workspace are there, and stay there
    assert podman.container_exists(name) and podman.volume_exists(name)
    assert podman.state(name)["Running"] is False
    await asyncio.sleep(2 + 2 * GRACE)
    assert (await client.get(name))["phase"] == "Stopped"
    assert "delete_requested" not in kinds(await client.history(name))

    reply = await client.start(name)
    await client.wait_for(name, "Ready", reply.seq)
    assert podman("exec", f"sandboxctl-{name}", "cat", "/workspace/notes.txt").stdout == "agent work\n"


async def test_a_leased_sandbox_is_not_stopped_until_the_lease_is_released(
    cli: CLI, client: SandboxClient, names, image: str
) -> None:
    name = names.new("leased")
    await client.create(name, image, idle_timeout=1)
    await client.wait_for(name, "Ready")
    code, out, err = await cli("lease", "acquire", name, "--ttl", "1m", "--holder", "agent-7")
    assert code == 0 and "agent-7" in out, err
    item = await settled(client, name)
    assert [lease["holder"] for lease in item["leases"]] == ["agent-7"]

    await asyncio.sleep(1 + GRACE + 2)  # well past its idle timeout and a grace period
    assert (await client.get(name))["phase"] == "Ready"
    assert not {"stop_warning", "stop_requested"} & set(kinds(await client.history(name)))
    code, _, err = await cli("lease", "renew", name, "--ttl", "1m", "--holder", "agent-7")
    assert code == 0, err
    code, _, err = await cli("lease", "renew", name, "--ttl", "1m", "--holder", "agent-8")
    assert code == 5 and "agent-8 holds no live lease" in err

    # released: idle from then on, so stopped a timeout and a grace period later
    code, _, err = await cli("lease", "release", name, "--holder", "agent-7")
    assert code == 0, err
    await client.wait_for(name, "Stopped", timeout=15)
    history = await client.history(name)
    assert kinds(history)[-5:] == ["lease_renewed", "lease_released", "stop_warning", "stop_requested", "stopped"]
    assert len(idle_stops(history)) == 1

    # every new event is in the log, and audit sees them like any other
    code, out, err = await cli("audit", "verify")
    assert code == 0 and "no violations" in out, err
    code, out, err = await cli("audit", "replay")
    assert code == 0 and json.loads(out)["differences"] == [], err


async def test_a_touch_in_the_grace_period_cancels_the_stop(cli: CLI, client: SandboxClient, names, image: str) -> None:
    name = names.new("touched")
    await client.create(name, image, idle_timeout=2)
    await client.wait_for(name, "Ready")
    warning = await wait_for_event(client, name, "stop_warning")
    code, out, err = await cli("touch", name)
    assert code == 0 and "touched" in out, err
    touched_at = time.monotonic()
    warned = warning.time.timestamp()
    assert time.time() < warned + GRACE, "the touch came after the grace period; the machine is too slow"

    await asyncio.sleep(max(0.0, touched_at + 1.6 - time.monotonic()))  # past the grace, before the next deadline
    item = await settled(client, name)
    assert item["phase"] == "Ready" and item["warning"] is None
    history = await client.history(name)
    assert kinds(history)[-3:] == ["stop_warning", "warning_cancelled", "touched"]
    assert history[-2]["data"] == {"kind": "stop", "cause": "touch"} and history[-2]["actor"] == "test"
    assert idle_stops(history) == []

    # the deadline is armed again from the touch, and fires once, for the new activity
    await client.wait_for(name, "Stopped", timeout=15)
    history = await client.history(name)
    (stop,) = idle_stops(history)
    touch_seq = [h["seq"] for h in history if h["type"].endswith("touched.v1")][-1]
    assert stop["id"].startswith(f"idle:{history[0]['data']['sandbox_id']}:{touch_seq}")


async def test_a_restarted_reaper_honours_earlier_deadlines_and_none_fires_twice(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    await plane.reaper.stop()  # no reaper while the deadlines pass
    a, b = names.new("restart"), names.new("restart")
    for name in (a, b):
        await client.create(name, image, idle_timeout=1)
    for name in (a, b):
        await client.wait_for(name, "Ready")
    await asyncio.sleep(1.5)  # both deadlines pass with no reaper running
    for name in (a, b):
        assert (await client.get(name))["phase"] == "Ready"

    connections: list[Any] = []

    async def reaper(grace: float) -> Reaper:
        nc = await nats.connect(config.nats_url)
        connections.append(nc)
        started = Reaper(nc, grace=grace, interval=0.1)
        await started.start()
        return started

    try:
        # the first reaper finds both deadlines in the log and warns, then dies in the grace period
        first = await reaper(grace=3.0)
        for name in (a, b):
            await wait_for_event(client, name, "stop_warning")
        await first.stop()
        for name in (a, b):
            assert (await client.get(name))["phase"] == "Ready"
            assert (await client.get(name))["warning"]["grace"] == 3.0

        # two reapers come up at once: the warnings' grace periods are still honoured, and each stop
        # is stored once, whoever sends it
        second, third = await asyncio.gather(reaper(grace=3.0), reaper(grace=3.0))
        for name in (a, b):
            await client.wait_for(name, "Stopped", timeout=20)
        await asyncio.sleep(1.0)  # they keep ticking: nothing more may fire
        await asyncio.gather(second.stop(), third.stop())
    finally:
        for nc in connections:
            await nc.close()

    for name in (a, b):
        events = await log_of(client, name)
        types = [env.type.split(".")[2] for _, env in events]
        assert types.count("stop_warning") == 1, types
        stops = [env for _, env in events if env.type.endswith("stop_requested.v1")]
        assert len(stops) == 1 and stops[0].data.reason == "idle", types
        warning = next(env for _, env in events if env.type.endswith("stop_warning.v1"))
        # the stop came a whole grace period after the warning, though its reaper died in between
        assert (stops[0].time - warning.time).total_seconds() >= 3.0
        sandbox_id = events[0][1].data.sandbox_id
        assert stops[0].causationid == f"idle:{sandbox_id}:{warning.data.activity_seq}"
        assert types[-2:] == ["stop_requested", "stopped"]


async def test_a_stop_hold_blocks_start_naming_the_holder(cli: CLI, client: SandboxClient, names, image: str) -> None:
    name = names.new("held")
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    code, out, err = await cli("hold", name, "--holder", "ops-7", "--reason", "disk audit")
    assert code == 0 and "ops-7" in out, err
    assert (await settled(client, name))["holds"] == [{"holder": "ops-7", "reason": "disk audit"}]

    code, _, err = await cli("start", name)
    assert code == 5, err
    assert err.startswith("sandboxctl: failed_precondition:") and "ops-7" in err and "stop hold" in err
    with pytest.raises(FailedPrecondition, match="ops-7"):
        await client.start(name)
    code, _, err = await cli("exec", name, "--", "true")  # ensure-running obeys it too
    assert code == 5 and "ops-7" in err
    assert (await client.get(name))["phase"] == "Stopped"

    code, _, err = await cli("unhold", name, "--holder", "ops-7")
    assert code == 0, err
    code, _, err = await cli("start", name)
    assert code == 0, err
    assert (await settled(client, name))["phase"] == "Ready"


async def test_auto_delete_is_opt_in_and_warned(
    cli: CLI, client: SandboxClient, names, image: str, engines: dict[str, Engine]
) -> None:
    kept, doomed = names.new("kept"), names.new("doomed")
    code, _, err = await cli("create", kept, "--image", image)
    assert code == 0, err
    code, _, err = await cli("create", doomed, "--image", image, "--auto-delete-after", "1s")
    assert code == 0, err
    for name in (kept, doomed):
        code, _, err = await cli("stop", name)
        assert code == 0, err
    await client.wait_for(doomed, "Deleted", timeout=20)
    history = await client.history(doomed)
    assert kinds(history)[-3:] == ["delete_warning", "delete_requested", "deleted"]
    deleting = history[kinds(history).index("delete_requested")]
    assert deleting["data"]["reason"] == "auto_delete" and deleting["actor"] == "sandboxctl/reaper"
    assert not engines["podman"].volume_exists(doomed)
    await asyncio.sleep(1 + GRACE)
    assert (await client.get(kept))["phase"] == "Stopped" and engines["podman"].volume_exists(kept)


async def test_with_authorization_on_the_reaper_stops_as_its_own_user_and_touch_needs_write(
    tmp_path, podman_url: str, names, image: str
) -> None:
    store = make_store(tmp_path / "auth")
    server = NatsServer(tmp_path / "nats", auth=store).start()
    config = auth_config(tmp_path, server.url, store, podman_url)
    config.idle_grace, config.reaper_interval = GRACE, 0.1
    plane = await ControlPlane(config).start()
    try:
        async for clients in role_clients(server.url, store):
            writer, reader = clients["writer"], clients["reader"]
            name = names.new("auth")
            await writer.create(name, image, idle_timeout=1)
            await writer.wait_for(name, "Ready")
            with pytest.raises(PermissionDenied):
                await reader.touch(name)
            with pytest.raises(PermissionDenied):
                await reader.acquire_lease(name, "reader", 60)
            await writer.touch(name)
            await writer.wait_for(name, "Stopped", timeout=15)
            history = await writer.history(name)
        (stop,) = idle_stops(history)
        assert stop["actor"] == "sandboxctl-reaper"
        assert [h["actor"] for h in history if h["type"].endswith("touched.v1")] == ["writer"]
    finally:
        await plane.stop()
        server.stop()


async def test_auto_archive_moves_a_sandbox_stopped_long_enough_into_the_store_and_start_brings_it_back(
    cli: CLI, client: SandboxClient, names, image: str, engines: dict[str, Engine]
) -> None:
    podman = engines["podman"]
    name = names.new("shelved")
    code, _, err = await cli("create", name, "--image", image, "--auto-archive-after", "1s")
    assert code == 0, err
    podman("exec", f"sandboxctl-{name}", "sh", "-c", "echo kept > /workspace/note")
    code, _, err = await cli("stop", name)
    assert code == 0, err
    archived = await client.wait_for(name, "Archived", timeout=30)
    assert archived["archive"] == f"{name}/{archived['sandbox_id']}" and archived["auto_archive_after"] == 1.0
    history = await client.history(name)
    assert kinds(history)[-3:] == ["archive_warning", "archive_requested", "archived"]
    archiving = history[kinds(history).index("archive_requested")]
    assert archiving["data"]["reason"] == "auto_archive" and archiving["actor"] == "sandboxctl/reaper"
    assert not podman.volume_exists(name) and not podman.container_exists(name)
    code, _, err = await cli("start", name)
    assert code == 0, err
    assert podman("exec", f"sandboxctl-{name}", "cat", "/workspace/note").stdout == "kept\n"
    assert (await client.get(name))["archive"] == ""


async def test_one_reaper_acts_at_a_time_and_another_takes_over_when_it_dies(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    """The plane's reaper holds the lease; a second one stands by (it sends nothing while the
    first lives). The first dies without a word (its tasks end, its lease is not given up): once
    its lease has expired the second acts, and the deadline fires once."""
    nc = await nats.connect(config.nats_url)
    standby = Reaper(nc, grace=GRACE, interval=0.1)
    try:
        await standby.start()
        await asyncio.sleep(0.5)
        assert plane.reaper.lease.held and not standby.lease.held
        for task in plane.reaper.tasks:  # dies: no release
            task.cancel()
        died = time.monotonic()
        name = names.new("failover")
        await client.create(name, image, idle_timeout=1)
        await client.wait_for(name, "Stopped", timeout=LEASE_TTL + 20)
        assert time.monotonic() - died >= 1 + GRACE
        assert standby.lease.held
        (stop,) = idle_stops(await client.history(name))
        assert stop["actor"] == "sandboxctl/reaper"
    finally:
        await standby.stop()
        await nc.close()
