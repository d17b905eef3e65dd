"""The services on a real nats-server and real podman: errors, races, restarts, the CLI.

What depends on the engine lives in test_contract.py, which runs on every engine; the CLI with
no server at all is tests/unit/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.events.replies import reply_decoder
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from sandboxctl.services.statemachine import StateMachineService
from tests.conftest import CLI, phase, run_cli_process


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
    twin = StateMachineService(twin_nc, config.drivers, config.default_driver, place=True)
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
    assert first.accepted and first.appended == 1
    assert second == first  # a retry is answered with the first outcome: its seq, its sandbox
    await client.wait_for(name, "Ready")
    assert [e["type"] for e in await client.history(name)].count("sandboxctl.sandbox.created.v1") == 1


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
