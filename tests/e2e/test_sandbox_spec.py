"""What a sandbox is made of and how it ends, on every engine: the resources it asks for are
enforced by the engine (read from the kernel's cgroup files inside the container) and shown by
``get``; its environment reaches its processes; a job whose main process exits 0 on its own is
Completed, not Error, and ``start`` runs it again; a command that names the log sequence it read
(``--if-seq``) is refused with ``conflict`` once the sandbox has moved, and appends nothing.
The parsing of these flags is tests/unit/test_cli_input.py; the decisions tests/unit/test_decider.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandboxctl.client import EXIT_STATUS, Conflict, NotFound, SandboxClient
from sandboxctl.events.replies import ErrorCode
from sandboxctl.events.spec import Resources
from sandboxctl.statemachine import Phase
from tests.conftest import CLI, Engine

CONFLICT = EXIT_STATUS[ErrorCode.CONFLICT]

# The limits as the kernel holds them, on cgroup v2 or v1: memory bytes, CPU quota per period, pids.
CGROUP = (
    "if [ -f /sys/fs/cgroup/memory.max ]; then "
    "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.max; else "
    "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
    "/sys/fs/cgroup/pids/pids.max; fi"
)


def in_sandbox(engine: Engine, name: str, script: str) -> str:
    return engine("exec", f"sandboxctl-{name}", "sh", "-c", script).stdout


def workspace_file(engine: Engine, image: str, name: str, path: str) -> str:
    """A file of a sandbox's workspace, read beside it (its container need not run)."""
    volume = f"sandboxctl-{name}-workspace"
    return engine("run", "--rm", "--network", "none", "-v", f"{volume}:/w", image, "cat", f"/w/{path}").stdout


async def test_resources_are_enforced_by_the_engine_and_env_reaches_the_processes_across_a_restart(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine, tmp_path: Path
) -> None:
    name = names.new("spec")
    env_file = tmp_path / "env"
    env_file.write_text("# from a file\nFROM_FILE=file value\nOVERRIDDEN=file\n")
    code, _, err = await cli(
        "create", name, "--image", image, "--driver", engine.name,
        "--cpus", "1.5", "--memory", "64m", "--pids", "64",
        "--env", "GREETING=hello world", "-e", "URL=http://x/?a=b", "--env-file", str(env_file),
        "--env", "OVERRIDDEN=flag",
    )  # fmt: skip
    assert code == 0, err
    item = await client.get(name)
    assert item["resources"] == {"cpus": 1.5, "memory": 64 * 2**20, "pids": 64}, item
    assert item["env"] == {
        "GREETING": "hello world", "URL": "http://x/?a=b", "FROM_FILE": "file value", "OVERRIDDEN": "flag"
    }  # fmt: skip
    for _ in range(2):  # as created, and again after a stop and a start
        limits = in_sandbox(engine, name, CGROUP).split()
        assert limits[0] == str(64 * 2**20), limits
        assert "150000" in limits[1:-1], limits  # 1.5 CPUs: 150,000 us of each 100,000 us period
        assert limits[-1] == "64", limits
        seen = in_sandbox(engine, name, 'printf "%s|%s|%s|%s" "$GREETING" "$URL" "$FROM_FILE" "$OVERRIDDEN"')
        assert seen == "hello world|http://x/?a=b|file value|flag", seen
        assert (await cli("stop", name, "--grace", "0"))[0] == 0
        assert (await cli("start", name))[0] == 0
    # the log says what it was made with, for history, audit and replay
    (created,) = [e for e in await client.history(name) if e["type"].endswith("created.v1")]
    assert created["data"]["resources"] == item["resources"] and created["data"]["env"] == item["env"]


async def test_a_sandbox_without_limits_gets_the_engines_defaults(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("plain")
    assert (await cli("create", name, "--image", image, "--driver", engine.name))[0] == 0
    item = await client.get(name)
    assert item["resources"] == {} and item["env"] == {}, item
    host = json.loads(engine("container", "inspect", f"sandboxctl-{name}").stdout)[0]["HostConfig"]
    assert not host.get("Memory") and not host.get("CpuQuota"), host


async def test_a_job_that_exits_0_is_completed_start_runs_it_again_and_a_failing_one_is_error(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    job = names.new("job")
    script = "echo ran >> /workspace/runs; sleep 1; exit 0"
    code, _, err = await cli("create", job, "--image", image, "--driver", engine.name, "--", "sh", "-c", script)
    assert code == 0, err  # a create waits for Ready; a job that ran and completed is there too
    item = await client.get(job)
    await client.wait_for(job, Phase.COMPLETED, item["last_seq"], timeout=60)
    item = await client.get(job)
    assert item["phase"] == "Completed" and item["last_error"] == "", item
    code, out, _ = await cli("list", "--phase", "Completed", "-o", "json")
    assert code == 0 and job in [i["name"] for i in json.loads(out)]
    code, out, _ = await cli("top", "--once")
    assert code == 0 and "Completed: 1" in out, out
    code, _, err = await cli("stop", job)  # nothing runs: nothing to stop
    assert code == 0, err
    assert (await client.get(job))["phase"] == "Completed"
    # start runs it again, on the same workspace
    code, _, err = await cli("start", job)
    assert code == 0, err
    seq = (await client.get(job))["last_seq"]
    await client.wait_for(job, Phase.COMPLETED, seq, timeout=60)
    assert workspace_file(engine, image, job, "runs") == "ran\nran\n"
    # a non-zero exit is still a failure, with its code
    bad = names.new("bad")
    reply = await client.create(bad, image, ["sh", "-c", "sleep 1; exit 3"], driver=engine.name)
    await client.wait_for(bad, Phase.ERROR, reply.seq, timeout=60)
    item = await client.get(bad)
    assert item["phase"] == "Error" and "exited with code 3" in item["last_error"], item
    # the job's history reads as what happened
    types = [e["type"].split(".")[2] for e in await client.history(job)]
    assert types.count("completed") == 2 and "failed" not in types, types


async def test_a_command_naming_a_log_sequence_the_sandbox_has_moved_past_is_a_conflict_and_changes_nothing(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("ifseq")
    code, _, err = await cli("create", name, "--image", image, "--driver", engine.name, "--if-seq", "0")
    assert code == 0, err
    seq = (await client.get(name))["last_seq"]
    before = await client.history(name)
    code, _, err = await cli("stop", name, "--if-seq", str(seq - 1))
    assert code == CONFLICT and len(err.splitlines()) == 1, (code, err)
    assert f"is at log seq {seq}, not {seq - 1}" in err, err
    with pytest.raises(Conflict) as raised:  # the SDK says where the sandbox stands, and does not retry
        await client.stop(name, expected_seq=seq - 1)
    assert raised.value.seq == seq
    assert await client.history(name) == before  # nothing appended
    assert engine.state(name)["Running"] is True  # nothing done on the engine
    code, _, err = await cli("create", name, "--image", image, "--driver", engine.name, "--if-seq", "0")
    assert code == CONFLICT and f"is at log seq {seq}, not 0" in err, (code, err)
    # read again, decide again: at the sequence it is at, the stop is done
    code, _, err = await cli("stop", name, "--if-seq", str(seq), "--grace", "0")
    assert code == 0, err
    assert (await client.get(name))["phase"] == "Stopped"
    reply = await client.start(name, expected_seq=(await client.get(name))["last_seq"])
    assert reply.accepted and reply.appended == 1


async def test_out_of_range_resources_sent_by_another_service_are_refused_and_nothing_is_made(
    client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("raw")
    for body in (
        {"resources": {"memory": 4096}},
        {"resources": {"cpus": 0}},
        {"resources": {"pids": 1}},
        {"resources": {"memroy": 2**30}},
        {"env": {"1BAD": "x"}},
        {"env": {"A": "x\u0000y"}},
        {"expected_seq": -1},
    ):
        command = {"type": "sandboxctl.command.create.v1", "name": name, "command_id": f"raw-{len(json.dumps(body))}",
                   "image": image, "driver": engine.name, **body}  # fmt: skip
        reply = await client._request("sandboxctl.cmd.create", json.dumps(command).encode())
        assert reply.error is not None and reply.error.code == ErrorCode.INVALID_ARGUMENT, (body, reply)
    with pytest.raises(NotFound):  # nothing in the log for the name
        await client.history(name)
    assert not engine.container_exists(name) and not engine.volume_exists(name)
    # and the SDK refuses them before sending
    with pytest.raises(Exception, match="memory"):
        await client.create(name, image, resources=Resources(memory=4096))


async def test_update_changes_labels_and_idle_timeout_at_once_and_resources_while_stopped_at_the_next_start(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("upd")
    code, _, err = await cli(
        "create", name, "--image", image, "--driver", engine.name, "--memory", "64m", "--pids", "64",
        "--label", "team=red", "--label", "keep=yes", "--env", "A=1",
    )  # fmt: skip
    assert code == 0, err
    in_sandbox(engine, name, "echo kept > /workspace/f")
    before = len(await client.history(name))
    # resources change only while nothing runs; the refusal changes nothing
    code, _, err = await cli("update", name, "--memory", "128m")
    assert code == EXIT_STATUS[ErrorCode.FAILED_PRECONDITION] and "stop it first" in err, (code, err)
    assert len(await client.history(name)) == before
    # labels and the idle timeout change at once, in any phase
    code, out, err = await cli("update", name, "--label", "tier=a", "--label", "team-", "--idle-timeout", "30m")
    assert code == 0 and "updated" in out, err
    item = await client.get(name)
    assert item["labels"] == {"keep": "yes", "tier": "a"} and item["idle_timeout"] == 1800, item
    code, out, _ = await cli("list", "--label", "tier=a", "-o", "json")
    assert [i["name"] for i in json.loads(out)] == [name]
    code, out, _ = await cli("update", name, "--label", "tier=a")  # nothing changes: nothing recorded
    assert code == 0 and "unchanged" in out, out
    # resources: while Stopped, applied at the next start, on the same workspace
    assert (await cli("stop", name, "--grace", "0"))[0] == 0
    code, _, err = await cli("update", name, "--memory", "128m", "--cpus", "0.5")
    assert code == 0, err
    item = await client.get(name)
    assert item["resources"] == {"cpus": 0.5, "memory": 128 * 2**20, "pids": 64}, item
    assert (await cli("start", name))[0] == 0
    limits = in_sandbox(engine, name, CGROUP).split()
    assert limits[0] == str(128 * 2**20) and "50000" in limits[1:-1] and limits[-1] == "64", limits
    assert in_sandbox(engine, name, "cat /workspace/f; echo $A") == "kept\n1\n"  # workspace and env kept
    item = await client.get(name)
    assert item["phase"] == "Ready" and item["last_error"] == "", item
    types = [e["type"].split(".")[2] for e in await client.history(name)]
    assert types.count("updated") == 2 and "failed" not in types, types
    # a stop, start and update made later still keep the new limits
    assert (await cli("stop", name, "--grace", "0"))[0] == 0
    assert (await cli("start", name))[0] == 0
    assert in_sandbox(engine, name, CGROUP).split()[0] == str(128 * 2**20)
