"""exec, shell and logs on every engine: ensure-running, the implicit lease, and the
container's own output, through the driver the sandbox records."""

from __future__ import annotations

import asyncio
import os
import sys

from sandboxctl.cli import attach
from sandboxctl.client import SandboxClient
from sandboxctl.runtime.config import Config
from tests.conftest import CLI, ROOT, Engine
from tests.logview import kinds, settled

# PID 1 prints, then ticks until it is stopped (and exits at once on SIGTERM).
TICKING = ["sh", "-c", "echo line-1; echo line-2; echo oops >&2; echo line-3; "
           "trap 'exit 0' TERM; i=0; while :; do sleep 0.2 & wait $!; i=$((i+1)); echo tick-$i; done"]  # fmt: skip


async def stopped(
    client: SandboxClient, name: str, image: str, engine: Engine, command: list[str] | None = None
) -> None:
    await client.create(name, image, command=command, driver=engine.name)
    await client.wait_for(name, "Ready")
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)


async def test_exec_starts_a_stopped_sandbox_and_runs_the_command_and_no_start_refuses(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("exec")
    await stopped(client, name, image, engine)
    before = len(await client.history(name))

    code, out, err = await cli("exec", name, "--no-start", "--", "true")
    assert code == 5, err
    assert err.startswith(f"sandboxctl: failed_precondition: sandbox {name} is Stopped") and "--no-start" in err
    assert len(err.strip().splitlines()) == 1
    assert (await client.get(name))["phase"] == "Stopped" and len(await client.history(name)) == before

    code, out, err = await cli(
        "exec", name, "--", "sh", "-c", "echo out; echo err >&2; echo kept > /workspace/f; exit 3"
    )
    assert code == 3, err  # the command's own exit code
    assert out == "out\n" and "err\n" in err
    assert (await settled(client, name))["phase"] == "Ready"
    assert engine.state(name)["Running"] is True
    new = kinds((await client.history(name))[before:])
    # leased before the start, touched, released after: the reaper never stops it under a running command
    assert new == ["lease_acquired", "start_requested", "ready", "touched", "lease_released"], new
    history = await client.history(name)
    assert history[-2]["data"] == {"via": "exec"} and (await client.get(name))["leases"] == []

    code, out, err = await cli("exec", name, "--no-start", "--", "cat", "/workspace/f")
    assert code == 0 and out == "kept\n", err
    code, _, err = await cli("exec", "no-such-sandbox", "--", "true")
    assert code == 3 and "not_found" in err


async def test_logs_show_the_container_output(
    cli: CLI, client: SandboxClient, config: Config, names, image: str, engine: Engine
) -> None:
    name = names.new("logs")
    await client.create(name, image, command=TICKING, driver=engine.name)
    await client.wait_for(name, "Ready")
    await asyncio.sleep(0.5)

    code, out, err = await cli("logs", name)
    assert code == 0, err
    lines = out.splitlines()
    # stdout in its order; stderr interleaved as the engine received it (docker may put it first)
    assert [line for line in lines if line.startswith("line-")] == ["line-1", "line-2", "line-3"], out
    assert "oops" in lines and "tick-1" in lines, out
    code, out, err = await cli("logs", name, "--tail", "1")
    assert code == 0 and out.count("\n") == 1 and out.startswith("tick-"), (out, err)
    code, out, err = await cli("logs", name, "--since", "1h")
    assert code == 0 and "line-1" in out, err
    code, out, err = await cli("logs", name, "--since", "2099-01-01T00:00:00Z")
    assert code == 0 and out == "", err
    code, _, err = await cli("logs", name, "--since", "yesterday-ish")
    assert code == 2 and "invalid_argument" in err
    assert "touched" not in kinds(await client.history(name))  # reading logs is not use

    # --follow keeps printing as the container writes, and ends when it stops
    seen: list[bytes] = []
    follow = asyncio.create_task(
        attach.show_logs(client, config, name, tail=0, follow=True, output=lambda _fd, chunk: seen.append(chunk))
    )
    for _ in range(100):
        if b"".join(seen).count(b"tick-") >= 3:
            break
        await asyncio.sleep(0.1)
    text = b"".join(seen).decode()
    assert text.count("tick-") >= 3 and "line-1" not in text, text
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    await asyncio.wait_for(follow, 15)


async def test_shell_runs_interactively_and_starts_a_stopped_sandbox(
    client: SandboxClient, config: Config, names, image: str, engine: Engine
) -> None:
    name = names.new("shell")
    await stopped(client, name, image, engine)
    env = {
        **os.environ,
        "SANDBOXCTL_NATS_URL": config.nats_url,
        "SANDBOXCTL_PODMAN_URL": config.podman_url,
        "SANDBOXCTL_DOCKER_URL": config.docker_url,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "shell", name, env=env, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    script = b"echo from-shell > /workspace/s.txt; cat /workspace/s.txt; exit 4\n"
    out, err = await asyncio.wait_for(proc.communicate(script), 60)
    assert proc.returncode == 4, err.decode()
    assert out.decode() == "from-shell\n"
    assert (await settled(client, name))["phase"] == "Ready"
    history = await client.history(name)
    assert "start_requested" in kinds(history) and {"via": "shell"} in [h["data"] for h in history]
