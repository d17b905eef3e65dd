"""An engine that pauses (SIGSTOP of the podman service or of dockerd, then SIGCONT), on every
engine: a stop that outlasts the pause is not a failure, since the engine took it and carries it
out once it runs again, so the sandbox follows the engine to Stopped instead of sitting in Error;
and exec and logs give a one-line error within their own bound instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandboxctl.cli.main import run_main
from sandboxctl.client import SandboxClient
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, PodmanService, make_driver
from tests.conftest import Engine
from tests.logview import kinds

# PID 1 ends on SIGTERM: a stop takes well under its grace once the engine runs.
TICKS = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]
DRIVER_TIMEOUT = 2.0  # the SDK's read timeout in these tests, so that a short pause outlasts it


@contextlib.contextmanager
def engine_process(engine: Engine, config: Config, tmp_path: Path) -> Iterator[int]:
    """The pid of a process that serves ``engine`` for ``config``: a podman service of the test's
    own (config is pointed at it), or the session's dockerd (its pid file is beside its socket)."""
    if engine.name == "podman":
        service = PodmanService(tmp_path / "paused-podman.sock").start()
        config.podman_url = service.url
        try:
            assert service.proc is not None
            yield service.proc.pid
        finally:
            service.stop()
    else:
        yield int((Path(config.docker_url.removeprefix("unix://")).parent / "docker.pid").read_text().strip())


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def plane_on(config: Config, engine: Engine) -> AsyncIterator[SandboxClient]:
    driver = make_driver(engine.name, config)
    driver.timeout = DRIVER_TIMEOUT
    plane = await ControlPlane(config, drivers={engine.name: driver}).start()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    try:
        yield client
    finally:
        await client.close()
        await plane.stop()


@pytest.mark.timeout(150)
async def test_a_stop_the_engine_carries_out_after_a_pause_ends_stopped_not_in_error(
    config: Config, nats_server, names, image: str, engine: Engine, tmp_path: Path
) -> None:
    with engine_process(engine, config, tmp_path) as pid:
        async with plane_on(config, engine) as client:
            name = names.new("pause")
            reply = await client.create(name, image, command=TICKS, driver=engine.name)
            await client.wait_for(name, "Ready", reply.seq, timeout=60)
            with paused(pid):
                stop = await client.stop(name, timeout=1)
                # Well past the stop's read timeout (grace + DRIVER_TIMEOUT): the engine has not answered.
                await asyncio.sleep(1 + DRIVER_TIMEOUT + 4)
                item = await client.get(name)
                assert item["phase"] == "Stopping", f"a paused engine failed the stop: {item['last_error']}"
            item = await client.wait_for(name, "Stopped", stop.seq, timeout=60)
            assert "failed" not in kinds(await client.history(name))
            assert engine.state(name)["Running"] is False


@pytest.mark.timeout(150)
async def test_exec_and_logs_give_one_line_when_the_engine_does_not_answer(
    config: Config, nats_server, names, image: str, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with engine_process(engine, config, tmp_path) as pid:
        async with plane_on(config, engine) as client:
            name = names.new("mute")
            reply = await client.create(name, image, command=TICKS, driver=engine.name)
            await client.wait_for(name, "Ready", reply.seq, timeout=60)
            with paused(pid):
                for argv in (
                    ["exec", name, "--engine-timeout", "2", "--", "true"],
                    ["logs", name, "--engine-timeout", "2"],
                ):
                    capsys.readouterr()
                    began = time.monotonic()
                    code = await asyncio.wait_for(run_main(argv, config), 20)
                    err = capsys.readouterr().err
                    assert time.monotonic() - began < 10, argv
                    assert code == 8, err
                    lines = err.strip().splitlines()
                    assert len(lines) == 1 and lines[0].startswith("sandboxctl: unavailable: "), lines
                    assert "did not answer" in lines[0] or "timed out" in lines[0].lower(), lines
            # once the engine runs again, both work
            capsys.readouterr()
            assert await run_main(["exec", name, "--", "echo", "back"], config) == 0
            assert capsys.readouterr().out == "back\n"
