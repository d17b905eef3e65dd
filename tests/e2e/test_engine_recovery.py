"""Recovery on every engine: a sandbox whose container was removed outside sandboxctl comes back
with ``start`` while its workspace is intact (files and all), and says plainly when it cannot;
a container still in its stop grace is alive, never reported as exited, so reconciliation
waits for the stop instead of calling the sandbox Stopped under a live process."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from sandboxctl.client import SandboxClient
from sandboxctl.drivers.base import SandboxSpec
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, make_driver
from tests.conftest import CLI, Engine

# PID 1 ignores SIGTERM, so a stop takes its whole grace and the engine shows it stopping meanwhile.
IGNORES_TERM = ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"]


async def test_start_makes_a_removed_container_again_and_the_files_survive(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("remade")
    reply = await client.create(name, image, command=IGNORES_TERM, labels={"team": "red"}, driver=engine.name)
    await client.wait_for(name, "Ready", reply.seq)
    code, _, err = await cli("exec", name, "--", "sh", "-c", "echo 'agent work' > /workspace/notes.txt")
    assert code == 0, err
    engine("rm", "-f", f"sandboxctl-{name}")
    assert (await client.wait_for(name, "Error", timeout=15))["last_error"] == "backend_missing"

    code, _, err = await cli("start", name)
    assert code == 0, err
    item = await client.get(name)
    assert item["phase"] == "Ready" and item["last_error"] == ""
    code, out, err = await cli("exec", name, "--no-start", "--", "cat", "/workspace/notes.txt")
    assert (code, out) == (0, "agent work\n"), err
    # made again as it was recorded: same image, command, labels, workspace
    attrs = json.loads(engine("container", "inspect", f"sandboxctl-{name}").stdout)[0]
    assert attrs["State"]["Running"] is True
    assert attrs["Config"]["Cmd"] == IGNORES_TERM and attrs["Config"]["Labels"]["team"] == "red"
    assert attrs["Config"]["Labels"]["sandboxctl.sandbox_id"] == item["sandbox_id"]
    assert [(m["Name"], m["Destination"]) for m in attrs["Mounts"]] == [(f"sandboxctl-{name}-workspace", "/workspace")]


async def test_start_says_plainly_when_the_container_and_the_workspace_are_both_gone(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("lost")
    reply = await client.create(name, image, driver=engine.name)
    await client.wait_for(name, "Ready", reply.seq)
    engine("rm", "-f", f"sandboxctl-{name}")
    engine("volume", "rm", f"sandboxctl-{name}-workspace")
    await client.wait_for(name, "Error", timeout=15)

    code, _, err = await cli("start", name)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    last_error = (await client.get(name))["last_error"]
    for words in ("both gone", "files are lost", "can only be deleted"):
        assert words in last_error and words in err, (last_error, err)
    assert not engine.container_exists(name) and not engine.volume_exists(name)  # nothing made up empty
    code, _, err = await cli("delete", name)
    assert code == 0, err


async def test_reconciliation_makes_again_the_container_of_a_sandbox_left_starting(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("starting")
    reply = await client.create(name, image, driver=engine.name)
    await client.wait_for(name, "Ready", reply.seq)
    engine("exec", f"sandboxctl-{name}", "sh", "-c", "echo kept > /workspace/f")
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    await plane.workers[[w.driver.name for w in plane.workers].index(engine.name)].stop()
    started = await client.start(name)  # in the log; no worker acts on it
    await plane.stop()
    engine("rm", "-f", f"sandboxctl-{name}")

    again = await ControlPlane(config).start()
    try:
        await client.wait_for(name, "Ready", started.seq, timeout=30)
        assert engine("exec", f"sandboxctl-{name}", "cat", "/workspace/f").stdout == "kept\n"
    finally:
        await again.stop()


def test_a_container_in_its_stop_grace_is_alive_not_exited(config: Config, names, image: str, engine: Engine) -> None:
    name = names.new("grace")
    driver = make_driver(engine.name, config)
    try:
        driver.create(SandboxSpec(name=name, sandbox_id="sb-grace", image=image, command=IGNORES_TERM))
        driver.start(name, "sb-grace")
        stopping = threading.Thread(target=driver.stop, args=(name, "sb-grace", 6), daemon=True)
        stopping.start()
        seen = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            state = engine.state(name)
            info = driver.inspect(name, "sb-grace")
            assert info is not None
            seen.append(state["Status"])
            if state["Pid"]:  # the process is alive
                assert info.running, f"{state['Status']} with a live process reported as exited"
            time.sleep(0.2)
        if engine.name == "podman":
            assert "stopping" in seen, seen  # podman shows the grace as a state of its own
        stopping.join(15)
        info = driver.inspect(name, "sb-grace")
        assert info is not None and not info.running and not info.stopping and info.status == "exited"
    finally:
        driver.close()


@pytest.mark.timeout(120)
async def test_reconciliation_never_calls_stopped_a_container_still_in_its_grace(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    """`up` stopped during a long stop grace and started again: the sandbox is Stopped only once
    its process is gone."""
    name = names.new("upstop")
    reply = await client.create(name, image, command=IGNORES_TERM, driver=engine.name)
    await client.wait_for(name, "Ready", reply.seq)
    stop = await client.stop(name, timeout=8)
    deadline = time.monotonic() + 10
    while engine.state(name)["Status"] != "stopping" and engine.name == "podman":
        assert time.monotonic() < deadline, "the engine never showed the stop under way"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    await plane.stop()  # the stop's grace runs on in the engine
    began = time.monotonic()

    again = await ControlPlane(config).start()
    try:
        while True:
            item = await client.get(name)
            if item["phase"] == "Stopped":
                state = engine.state(name)
                assert not state["Running"] and not state["Pid"] and state["Status"] == "exited", state
                break
            assert item["phase"] == "Stopping", item
            assert time.monotonic() - began < 30, "the stop never completed"
            await asyncio.sleep(0.05)
        assert item["last_seq"] > stop.seq
    finally:
        await again.stop()
