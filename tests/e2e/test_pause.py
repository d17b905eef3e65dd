"""Pause and resume on every engine: the engine freezes the sandbox's processes (memory kept, no
CPU used) and thaws them where they were; Paused is a phase of its own, apart from Stopped and
Error; a paused sandbox can be stopped, exec'd into (resumed first) and deleted; one killed from
outside is Error; the reaper may pause an idle sandbox instead of stopping it. The decisions are
tests/unit/test_decider.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from sandboxctl.client import EXIT_STATUS, SandboxClient
from sandboxctl.events.replies import ErrorCode
from sandboxctl.runtime.config import Config
from sandboxctl.statemachine import Phase
from tests.conftest import CLI, Engine, until

# Counts in its own memory (a shell variable), and writes the count where the test can read it:
# after a thaw it goes on from where it was, which a restarted process could not.
# Written by rename, never truncated in place: a reader never sees the file empty.
COUNTER = [
    "sh",
    "-c",
    "trap 'exit 0' TERM; i=0; while :; do i=$((i+1)); "
    "echo $i > /workspace/count.new; mv /workspace/count.new /workspace/count; sleep 0.05; done",
]


def count(engine: Engine, name: str) -> int:
    """The counter as the workspace has it, read on the host beside the sandbox (its container
    may be frozen). The counter rewrites the file every 50 ms: a read between its truncation and
    its write finds it empty, and is made again."""
    where = engine.workspace_path(name) / "count"
    for _ in range(50):
        text = where.read_text() if where.exists() else ""
        if text.strip():
            return int(text)
        time.sleep(0.01)
    return 0


def kinds_of(history: list[dict[str, object]]) -> list[str]:
    """What happened to a sandbox, for a failure's message: its events' kinds, in order."""
    return [str(h["type"]).split(".")[2] for h in history]


@pytest.fixture
def config(config: Config) -> Config:
    config.idle_grace = 1.0
    config.reaper_interval = 0.1
    return config


async def test_pause_freezes_the_processes_with_their_memory_and_resume_thaws_them_where_they_were(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("pz")
    reply = await client.create(name, image, COUNTER, driver=engine.name)
    await client.wait_for(name, Phase.READY, reply.seq)
    await until(lambda: count(engine, name) >= 20, "count of 20")  # it has counted a while
    code, out, err = await cli("pause", name)
    assert code == 0 and "1 sandbox paused" in out, err
    item = await client.get(name)
    assert item["phase"] == "Paused" and item["last_error"] == "", item
    assert engine.state(name)["Paused"] is True
    frozen = count(engine, name)
    await asyncio.sleep(1.0)
    assert count(engine, name) == frozen  # no CPU: the count does not move
    assert (await cli("pause", name))[0] == 0  # already paused: nothing to do
    code, _, err = await cli("resume", name)
    assert code == 0, err
    assert (await client.get(name))["phase"] == "Ready" and engine.state(name)["Paused"] is False
    # counting again, from where it was: its memory was kept (a new process would count from 1)
    await until(lambda: count(engine, name) > frozen, f"count past {frozen}", timeout=10)
    types = [e["type"].split(".")[2] for e in await client.history(name)]
    assert types[-4:] == ["pause_requested", "paused", "resume_requested", "ready"], types


async def test_a_paused_sandbox_is_resumed_by_exec_stopped_by_stop_and_refused_what_does_not_fit(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("pzx")
    reply = await client.create(name, image, COUNTER, driver=engine.name)
    await client.wait_for(name, Phase.READY, reply.seq)
    assert (await cli("pause", name))[0] == 0
    code, out, err = await cli("exec", name, "--", "cat", "/workspace/count")  # resumes it first
    assert code == 0 and int(out) > 0, err
    assert (await client.get(name))["phase"] == "Ready"
    code, _, err = await cli("pause", name)
    assert code == 0, (err, kinds_of(await client.history(name)))
    code, _, err = await cli("exec", name, "--no-start", "--", "true")
    assert code == EXIT_STATUS[ErrorCode.FAILED_PRECONDITION] and "resume" in err, (code, err)
    # a paused sandbox stops (the engine thaws it to stop it), and keeps its workspace
    code, _, err = await cli("stop", name, "--grace", "2")
    assert code == 0, err
    assert (await client.get(name))["phase"] == "Stopped" and engine.state(name)["Running"] is False
    # what does not fit the phase is refused, and nothing is appended
    before = len(await client.history(name))
    code, _, err = await cli("pause", name)
    assert code == EXIT_STATUS[ErrorCode.FAILED_PRECONDITION] and "Stopped; pause is allowed in" in err, err
    code, _, err = await cli("resume", name)
    assert code == EXIT_STATUS[ErrorCode.FAILED_PRECONDITION] and "resume is allowed in" in err, err
    assert len(await client.history(name)) == before
    assert count(engine, name) > 0


async def test_a_paused_sandbox_killed_from_outside_is_error_and_a_pause_made_outside_is_seen(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("pzk")
    reply = await client.create(name, image, COUNTER, driver=engine.name)
    await client.wait_for(name, Phase.READY, reply.seq)
    engine("pause", f"sandboxctl-{name}")  # behind sandboxctl's back: the phase follows the engine
    item = await client.wait_for(name, Phase.PAUSED, reply.seq + 1, timeout=15)
    engine("unpause", f"sandboxctl-{name}")
    item = await client.wait_for(name, Phase.READY, item["last_seq"], timeout=15)
    assert (await cli("pause", name))[0] == 0
    engine("kill", f"sandboxctl-{name}")
    item = await client.wait_for(name, Phase.ERROR, item["last_seq"], timeout=15)
    assert "exited with code 137" in item["last_error"], item
    # and start brings it back
    code, _, err = await cli("start", name)
    assert code == 0, err


async def test_the_reaper_pauses_an_idle_sandbox_created_to_be_paused_and_exec_resumes_it(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("pzi")
    code, _, err = await cli(
        "create", name, "--image", image, "--driver", engine.name, "--idle-timeout", "2s", "--idle-action", "pause",
        "--", *COUNTER,
    )  # fmt: skip
    assert code == 0, err
    item = await client.wait_for(name, Phase.PAUSED, timeout=20)
    assert item["idle_timeout"] == 2
    (pause,) = [e for e in await client.history(name) if e["type"].endswith("pause_requested.v1")]
    assert pause["actor"] == "sandboxctl/reaper" and pause["data"]["reason"] == "idle"
    assert engine.state(name)["Paused"] is True and engine.volume_exists(name)
    code, out, err = await cli("exec", name, "--", "cat", "/workspace/count")
    assert code == 0 and int(out) > 0, err
    # the idle action is the sandbox's own, and can be changed
    code, _, err = await cli("update", name, "--idle-action", "stop", "--idle-timeout", "0")
    assert code == 0, err
