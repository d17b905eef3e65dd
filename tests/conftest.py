"""Fixtures that start real parts: a nats-server per test, one podman service
per session, and the whole control plane in the test's event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.cli import run_main
from services.client import SandboxClient
from services.config import Config
from services.embedded import ControlPlane, NatsServer, PodmanService

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("SANDBOXCTL_TEST_IMAGE", "localhost/sandboxctl-busybox:latest")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def image() -> str:
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        subprocess.run(["bash", str(ROOT / "scripts" / "build-test-image.sh")], check=True)
    return IMAGE


@pytest.fixture(scope="session")
def podman_url(tmp_path_factory: pytest.TempPathFactory, image: str) -> Iterator[str]:
    service = PodmanService(tmp_path_factory.mktemp("podman") / "podman.sock").start()
    yield service.url
    service.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def config(tmp_path: Path, nats_server: NatsServer, podman_url: str) -> Config:
    return Config(
        nats_url=nats_server.url,
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
        podman_url=podman_url,
        drivers=("podman",),
        default_driver="podman",
        actor="test",
    )


@pytest.fixture
async def plane(config: Config) -> AsyncIterator[ControlPlane]:
    plane = await ControlPlane(config).start()
    yield plane
    await plane.stop()


@pytest.fixture
async def client(config: Config, plane: ControlPlane) -> AsyncIterator[SandboxClient]:
    client = await SandboxClient.connect(config.nats_url, actor="test")
    yield client
    await client.close()


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Unique sandbox names for a test; their containers and volumes are removed after it."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    made: list[str] = []

    class Names(list[str]):
        def new(self, label: str = "sb") -> str:
            name = f"{prefix}-{label}-{len(made)}"
            made.append(name)
            return name

    yield Names()
    for name in made:
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


class CLI:
    def __init__(self, config: Config, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await run_main(list(argv), self.config)
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def cli(config: Config, plane: ControlPlane, capsys: pytest.CaptureFixture[str]) -> CLI:
    return CLI(config, capsys)


async def run_cli_process(config: Config, *argv: str) -> tuple[int, str, str]:
    """The installed console script in its own process, as a user runs it."""
    env = {**os.environ, "SANDBOXCTL_NATS_URL": config.nats_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *argv,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()
