"""The whole lifecycle on a real nats-server and real podman (issue 2's acceptance)."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from events import subjects
from events.replies import reply_decoder
from services.client import SandboxClient, SandboxError
from services.config import Config
from services.embedded import ControlPlane
from services.statemachine import StateMachineService
from tests.conftest import CLI, podman, run_cli_process


def container_state(name: str) -> dict[str, object]:
    out = podman("container", "inspect", f"sandboxctl-{name}").stdout
    return json.loads(out)[0]["State"]


def container_exists(name: str) -> bool:
    return podman("container", "exists", f"sandboxctl-{name}", check=False).returncode == 0


def volume_exists(name: str) -> bool:
    return podman("volume", "exists", f"sandboxctl-{name}-workspace", check=False).returncode == 0


async def phase(cli: CLI, name: str) -> str:
    code, out, err = await cli("get", name, "-o", "json")
    assert code == 0, err
    return json.loads(out)["phase"]


async def test_workspace_survives_stop_and_start_and_delete_removes_it(cli: CLI, names, image: str) -> None:
    name = names.new()
    code, out, err = await cli("create", name, "--image", image, "--label", "team=a")
    assert code == 0, err
    assert await phase(cli, name) == "Ready"
    podman("exec", f"sandboxctl-{name}", "sh", "-c", "echo 'agent work' > /workspace/notes.txt")

    code, _, err = await cli("stop", name)
    assert code == 0, err
    assert await phase(cli, name) == "Stopped"
    state = container_state(name)
    assert state["Running"] is False and state["Status"] == "exited"
    assert volume_exists(name)

    code, _, err = await cli("start", name)
    assert code == 0, err
    assert await phase(cli, name) == "Ready"
    assert container_state(name)["Running"] is True
    assert podman("exec", f"sandboxctl-{name}", "cat", "/workspace/notes.txt").stdout == "agent work\n"

    code, _, err = await cli("delete", name)
    assert code == 0, err
    assert not container_exists(name)
    assert not volume_exists(name)
    assert await phase(cli, name) == "Deleted"

    code, out, _ = await cli("history", name, "-o", "json")
    types = [e["type"].split(".")[2] for e in json.loads(out)]
    assert types == [
        "created",
        "ready",
        "stop_requested",
        "stopped",
        "start_requested",
        "ready",
        "delete_requested",
        "deleted",
    ]


async def test_kill_from_outside_is_error_not_stopped_and_start_recovers(
    cli: CLI, client: SandboxClient, names, image: str
) -> None:
    name = names.new()
    assert (await cli("create", name, "--image", image))[0] == 0
    podman("kill", f"sandboxctl-{name}")
    item = await client.wait_for(name, "Error", timeout=10)
    assert "137" in item["last_error"]
    code, _, err = await cli("start", name)
    assert code == 0, err
    assert await phase(cli, name) == "Ready"
    assert container_state(name)["Running"] is True


async def test_stop_on_stopped_succeeds_and_appends_nothing(cli: CLI, client: SandboxClient, names, image: str) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    assert (await cli("stop", name))[0] == 0
    before = await client.history(name)
    reply = await client.stop(name)
    assert reply.accepted and reply.appended == 0 and reply.phase == "Stopped"
    code, _, err = await cli("stop", name)
    assert code == 0, err
    await asyncio.sleep(0.2)
    assert await client.history(name) == before


async def test_bad_names_give_their_error_codes(cli: CLI, client: SandboxClient, names, image: str) -> None:
    code, _, err = await cli("create", "", "--image", image)
    assert code == 2 and err.strip().startswith("sandboxctl: invalid_argument:") and len(err.strip().splitlines()) == 1
    code, _, err = await cli("stop", "nope-never-made")
    assert code == 3 and "not_found" in err
    name = names.new()
    assert (await cli("create", name, "--image", image))[0] == 0
    code, _, err = await cli("create", name, "--image", image)
    assert code == 4 and "already_exists" in err
    with pytest.raises(SandboxError) as caught:
        await client.start("")
    assert caught.value.code == "invalid_argument"
    with pytest.raises(SandboxError) as caught:
        await client.get("nope-never-made")
    assert caught.value.code == "not_found"


async def test_transition_not_allowed_is_failed_precondition(client: SandboxClient, names, image: str) -> None:
    name = names.new()
    await client.create(name, image, command=["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"])
    await client.wait_for(name, "Ready")
    await client.stop(name)
    await client.wait_for(name, "Stopped")
    await client.delete(name)
    with pytest.raises(SandboxError) as caught:
        await client.stop(name)
    assert caught.value.code in ("failed_precondition", "not_found")


async def test_concurrent_stops_append_exactly_one_stop_request(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    # A second state-machine instance on the same NATS, with a cache of its own,
    # shares the command queue group: racing stops land on both.
    twin_nc = await nats.connect(config.nats_url)
    twin = StateMachineService(twin_nc)
    await twin.start()
    try:
        name = names.new()
        await client.create(name, image)
        await client.wait_for(name, "Ready")
        replies = await asyncio.gather(*(client.stop(name) for _ in range(10)))
        assert all(r.accepted for r in replies)
        assert sum(r.appended for r in replies) == 1
        # The twin's handler directly, with a cache that may lag: still no second append.
        both = await asyncio.gather(
            plane.statemachine.handle(
                subjects.command("stop"),
                b'{"type":"sandboxctl.command.stop.v1","name":"%s","command_id":"x1"}' % name.encode(),
            ),
            twin.handle(
                subjects.command("stop"),
                b'{"type":"sandboxctl.command.stop.v1","name":"%s","command_id":"x2"}' % name.encode(),
            ),
        )
        assert sum(r.appended for r in both) == 0
        await client.wait_for(name, "Stopped")
        history = await client.history(name)
        assert [e["type"] for e in history].count("sandboxctl.sandbox.stop_requested.v1") == 1
    finally:
        await twin.stop()
        await twin_nc.close()


async def test_same_command_id_twice_is_stored_once(client: SandboxClient, names, image: str) -> None:
    name = names.new()
    first = await client.create(name, image, command_id="create-once")
    second = await client.create(name, image, command_id="create-once")
    assert first.accepted and second.accepted and second.appended == 0
    await client.wait_for(name, "Ready")
    assert [e["type"] for e in await client.history(name)].count("sandboxctl.sandbox.created.v1") == 1


async def test_stop_all_stops_every_ready_sandbox(cli: CLI, client: SandboxClient, names, image: str) -> None:
    made = [names.new() for _ in range(4)]
    await asyncio.gather(*(client.create(n, image) for n in made))
    await asyncio.gather(*(client.wait_for(n, "Ready") for n in made))
    await client.stop(made[0])
    await client.wait_for(made[0], "Stopped")
    code, out, err = await cli("stop", "--all")
    assert code == 0, err
    for n in made:
        assert await phase(cli, n) == "Stopped"
        assert container_state(n)["Running"] is False
    code, out, _ = await cli("list", "-o", "json", "--phase", "Ready")
    assert json.loads(out) == []


async def test_get_json_and_list_filters(cli: CLI, client: SandboxClient, names, image: str) -> None:
    a, b = names.new(), names.new()
    await client.create(a, image, labels={"team": "red"})
    await client.create(b, image, labels={"team": "blue"})
    await client.wait_for(a, "Ready")
    await client.wait_for(b, "Ready")
    code, out, _ = await cli("get", a, "-o", "json")
    item = json.loads(out)
    assert code == 0 and item["phase"] == "Ready" and item["labels"] == {"team": "red"} and item["driver"] == "podman"
    assert item["image"] == image and item["last_seq"] > 0 and item["created_at"]
    code, out, _ = await cli("list", "-o", "json", "--label", "team=blue")
    assert [s["name"] for s in json.loads(out)] == [b]
    code, out, _ = await cli("list", "-o", "yaml")
    assert f"name: {a}" in out and "phase: Ready" in out
    code, out, _ = await cli("list")
    assert out.splitlines()[0].split()[:2] == ["NAME", "PHASE"]


async def test_answers_are_rebuilt_from_the_log_after_every_service_restarts(
    config: Config, plane: ControlPlane, cli: CLI, client: SandboxClient, names, image: str
) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    before_get, before_history = await cli("get", name, "-o", "json"), await cli("history", name, "-o", "json")

    await plane.stop()
    config.projection_path.unlink()  # nothing left but the log
    for suffix in ("-wal", "-shm"):
        config.projection_path.with_name(config.projection_path.name + suffix).unlink(missing_ok=True)
    again = await ControlPlane(config).start()
    try:
        await asyncio.wait_for(again.projector.caught_up.wait(), 10)
        assert again.statemachine.states[name].phase.value == "Stopped"
        assert await cli("get", name, "-o", "json") == before_get
        assert await cli("history", name, "-o", "json") == before_history
        # and the restarted services still act
        assert (await cli("start", name))[0] == 0
        assert await phase(cli, name) == "Ready"
    finally:
        await again.stop()


async def test_garbage_on_the_command_subject_gets_an_error_and_the_service_keeps_answering(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    nc = await nats.connect(config.nats_url)
    try:
        for subject, payload in [
            (subjects.command("stop"), b"\x00\xff garbage {"),
            (subjects.command("create"), b'{"type":"sandboxctl.command.create.v1"}'),
            (subjects.command("stop"), b'{"type":"sandboxctl.command.nope.v9","name":"x","command_id":"1"}'),
            (subjects.command("stop"), b'{"type":"sandboxctl.command.start.v1","name":"x","command_id":"1"}'),
            (subjects.query("get"), b"]]"),
        ]:
            msg = await nc.request(subject, payload, timeout=5)
            reply = reply_decoder.decode(msg.data)
            assert reply.accepted is False and reply.error is not None
            assert reply.error.code == "invalid_argument" and reply.error.message
    finally:
        await nc.close()
    name = names.new()
    assert (await client.create(name, image)).accepted
    await client.wait_for(name, "Ready")


async def test_console_script_exits_non_zero_with_one_line(config: Config, plane: ControlPlane) -> None:
    code, out, err = await run_cli_process(config, "get", "no-such-sandbox")
    assert code == 3
    assert err.strip() == "sandboxctl: not_found: sandbox no-such-sandbox not found"
    code, out, err = await run_cli_process(config, "list", "-o", "json")
    assert code == 0 and json.loads(out) == []


async def test_cli_without_a_server_says_so(tmp_path) -> None:
    from services.embedded import free_port

    config = Config(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=tmp_path)
    code, _, err = await run_cli_process(config, "list")
    assert code == 8 and err.startswith("sandboxctl: unavailable:") and len(err.strip().splitlines()) == 1


async def test_events_prints_the_log(cli: CLI, client: SandboxClient, names, image: str) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    code, out, err = await cli("events", "-o", "json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in lines if e["subject"] == name] == [
        "sandboxctl.sandbox.created.v1",
        "sandboxctl.sandbox.ready.v1",
    ]
    assert all(e["seq"] > 0 and e["id"] and e["time"] for e in lines)
