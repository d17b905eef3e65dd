"""exec as a user runs it, in a process of its own with real pipes, on every engine: piped
standard input reaches the command (and a terminal does not), and a command never outlives
the CLI that started it (a closed output pipe, SIGTERM, SIGINT), children included."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import threading
import time

import pytest

from sandboxctl.client import SandboxClient
from sandboxctl.drivers import base
from sandboxctl.drivers.base import ExecControl
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import make_driver
from tests.conftest import ROOT, Engine
from tests.logview import kinds

# Two busy processes: the exec'd shell's child in the background and the one it waits on.
BUSY = ["sh", "-c", "yes > /dev/null & yes > /dev/null; wait"]


def cli_env(config: Config) -> dict[str, str]:
    return {
        **os.environ,
        "SANDBOXCTL_NATS_URL": config.nats_url,
        "SANDBOXCTL_PODMAN_URL": config.podman_url,
        "SANDBOXCTL_DOCKER_URL": config.docker_url,
    }


async def spawn(config: Config, *argv: str, stdin: int | None = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", *argv, env=cli_env(config), cwd=ROOT,
        stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def ready(client: SandboxClient, name: str, image: str, engine: Engine) -> str:
    reply = await client.create(name, image, driver=engine.name)
    item = await client.wait_for(name, "Ready", reply.seq)
    return str(item["sandbox_id"])


def yes_pids(engine: Engine, name: str) -> list[str]:
    """The `yes` processes running in the sandbox's container, as the engine's own exec sees them."""
    found = engine("exec", f"sandboxctl-{name}", "pidof", "yes", check=False).stdout.split()
    return found


async def until_yes(engine: Engine, name: str, running: bool, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        pids = await asyncio.to_thread(yes_pids, engine, name)
        if bool(pids) is running or time.monotonic() > deadline:
            return pids
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_piped_stdin_reaches_the_command_whole(
    config: Config, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("stdin")
    await ready(client, name, image, engine)
    data = os.urandom(3 * 1024 * 1024 + 17)  # several MB, in many chunks, not a multiple of any of them
    proc = await spawn(config, "exec", name, "--", "sh", "-c", "cat > /workspace/f; md5sum < /workspace/f")
    out, err = await asyncio.wait_for(proc.communicate(data), 90)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split()[0] == hashlib.md5(data).hexdigest()
    # the file is in the workspace, byte for byte
    proc = await spawn(config, "exec", name, "--", "wc", "-c", "/workspace/f")
    out, err = await asyncio.wait_for(proc.communicate(b""), 60)
    assert proc.returncode == 0 and out.decode().split()[0] == str(len(data)), err.decode()
    # a short input, echoed back; and input that ends at once is an empty input, not a hang
    proc = await spawn(config, "exec", name, "--", "cat")
    out, err = await asyncio.wait_for(proc.communicate(b"hello\nworld"), 60)
    assert (proc.returncode, out) == (0, b"hello\nworld"), err.decode()
    proc = await spawn(config, "exec", name, "--", "sh", "-c", "cat; echo end", stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, out) == (0, b"end\n"), err.decode()
    # --no-stdin keeps a pipe for the caller (a `while read` loop around exec, say)
    proc = await spawn(config, "exec", name, "--no-stdin", "--", "sh", "-c", "cat; echo end")
    out, err = await asyncio.wait_for(proc.communicate(b"not for the command"), 60)
    assert (proc.returncode, out) == (0, b"end\n"), err.decode()


@pytest.mark.timeout(120)
async def test_a_terminal_is_not_taken_as_input(
    config: Config, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    """Like docker exec without -i: an exec from a terminal does not read the keyboard (shell is
    for that), so a command that reads its input finds it empty instead of waiting on the user."""
    name = names.new("tty")
    await ready(client, name, image, engine)
    leader, follower = os.openpty()
    try:
        proc = await spawn(config, "exec", name, "--", "sh", "-c", "cat; echo done", stdin=follower)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        os.close(leader)
        os.close(follower)
    assert (proc.returncode, out) == (0, b"done\n"), err.decode()


@pytest.mark.timeout(120)
async def test_a_closed_output_pipe_ends_the_command_and_says_so(
    config: Config, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    """`sandboxctl exec NAME -- yes | head -c 100`: once head has its 100 bytes, yes must not go
    on in the sandbox at full CPU with nobody reading (and no lease)."""
    name = names.new("pipe")
    await ready(client, name, image, engine)
    reader, writer = os.pipe()  # the CLI's stdout; this test is `head -c 100` at the other end
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandboxctl.cli", "exec", name, "--", "sh", "-c", "yes & yes; wait",
            env=cli_env(config), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=writer,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert proc.stderr is not None
    head = b""
    while len(head) < 100:
        chunk = await asyncio.wait_for(asyncio.to_thread(os.read, reader, 100 - len(head)), 60)
        assert chunk, "the CLI ended before any output"
        head += chunk
    assert head.startswith(b"y\n")
    assert await until_yes(engine, name, running=True, within=10), "the command never ran"
    os.close(reader)  # head has its 100 bytes and exits
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 141, err.decode()
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sandboxctl: broken_pipe: "), lines
    assert await until_yes(engine, name, running=False, within=5) == [], "yes still runs after the pipe closed"
    assert kinds(await client.history(name))[-1] == "lease_released"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signalled_cli_ends_the_command_and_what_it_started(
    config: Config, client: SandboxClient, names, image: str, engine: Engine, signum: int
) -> None:
    name = names.new("sig")
    await ready(client, name, image, engine)
    proc = await spawn(config, "exec", name, "--", *BUSY)
    assert proc.stderr is not None
    assert len(await until_yes(engine, name, running=True, within=30)) == 2, "the command never ran"
    proc.send_signal(signum)
    code = await asyncio.wait_for(proc.wait(), 30)
    err = (await proc.stderr.read()).decode()
    assert code == 128 + signum, err
    assert err.strip().splitlines() == [
        f"sandboxctl: interrupted: {signal.Signals(signum).name}: the command in sandbox {name} was ended"
    ]
    assert await until_yes(engine, name, running=False, within=5) == [], "the command outlived the CLI"
    assert kinds(await client.history(name))[-1] == "lease_released"


@pytest.mark.timeout(120)
async def test_an_abandoned_exec_is_ended_from_inside_the_container_when_the_host_cannot(
    config: Config, client: SandboxClient, names, image: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLI that cannot see or signal the container's processes (another PID namespace, another
    user) still ends them: from inside the container, by the mark in their environment."""
    name = names.new("inside")
    sandbox_id = await ready(client, name, image, engine)
    monkeypatch.setattr(base._ExecRun, "_end_from_host", lambda self: False)
    driver = make_driver(engine.name, config)
    control = ExecControl()
    result: list[object] = []

    def run() -> None:
        try:
            result.append(driver.exec(name, sandbox_id, BUSY, lambda fd, chunk: None, None, control))
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert len(await until_yes(engine, name, running=True, within=30)) == 2, "the command never ran"
        await asyncio.to_thread(control.abort)
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive() and result, "the exec did not return once aborted"
        assert await until_yes(engine, name, running=False, within=5) == []
    finally:
        driver.close()
