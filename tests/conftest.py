"""The suite's shared fixtures, and its layers.

Tests live in three folders, each a layer with a marker of the same name (``pytest -m unit``):

- ``tests/unit``: pure; no NATS, no engine, no root. Runs in seconds anywhere.
- ``tests/integration``: a real nats-server (``nats_server``, ``auth_server``), no engine.
- ``tests/e2e``: real engines (``podman_url``, ``docker_url``, ``engines``, ``engine``, and what
  builds on them: ``config``, ``plane``, ``client``, ``cli``, ``names``, ...).

The fixtures here start real parts: a nats-server per test, one podman service and one docker
daemon per session, and the whole control plane in the test's event loop. Tests that take the
``engine`` fixture run once per engine. Importing this module starts nothing; a fixture starts
its part only when a test asks for it, and a test asking for one its layer may not use is an
error at collection.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from sandboxctl.auth import AuthStore
from sandboxctl.cli.main import run_main
from sandboxctl.client import SandboxClient
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer, PodmanService
from testing.dockerd import DockerDaemon

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
IMAGE = os.environ.get("SANDBOXCTL_TEST_IMAGE", "localhost/sandboxctl-busybox:latest")
# Every up and serve a test runs serves its web console on a free port, not the default one: tests
# run beside each other, and beside a developer's own up.
os.environ.setdefault("SANDBOXCTL_CONSOLE", "127.0.0.1:0")
ENGINES = ("podman", "docker")

LAYERS = ("unit", "integration", "e2e")  # the folders under tests/, each also a marker
# The fixtures that start an engine or build on one (or need root, like small_disk's mount):
# the e2e layer's alone.
ENGINE_FIXTURES = frozenset(
    {"image", "podman_url", "docker_url", "engines", "engine", "podman_config", "config", "plane", "client", "cli"}
    | {"names", "sandboxes", "small_disk", "podman_service"}
)
# The fixtures that start a nats-server: integration and e2e.
SERVER_FIXTURES = frozenset({"nats_server", "auth_server", "nats_config", "nc"})
FORBIDDEN = {"unit": ENGINE_FIXTURES | SERVER_FIXTURES, "integration": ENGINE_FIXTURES, "e2e": frozenset()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer, the folder it is in; refuse a test outside the layers, and
    one that asks for a fixture its layer may not use (a unit test that would start a server)."""
    wrong: list[str] = []
    for item in items:
        path = Path(item.path).resolve()
        if not path.is_relative_to(TESTS):
            continue
        parts = path.relative_to(TESTS).parts
        layer = parts[0] if len(parts) > 1 else ""
        if layer not in LAYERS:
            wrong.append(f"{item.nodeid}: is in no layer; put it under tests/unit, tests/integration or tests/e2e")
            continue
        item.add_marker(getattr(pytest.mark, layer))
        used = sorted(FORBIDDEN[layer] & set(item.fixturenames))
        if used:
            wrong.append(f"{item.nodeid}: a {layer} test may not use {', '.join(used)}; move it to a layer that may")
    if wrong:
        raise pytest.UsageError("tests in the wrong layer (tests/conftest.py):\n  " + "\n  ".join(wrong))


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


async def until(check: Callable[[], object], what: str, timeout: float = 30.0, every: float = 0.02) -> None:
    """Return once check() (a function, or a coroutine function) gives a true value; fail the test
    naming what did not come within timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"no {what} within {timeout:g}s"
        await asyncio.sleep(every)


class Engine:
    """An engine's own command line, for doing things behind sandboxctl's back."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        base = ["podman"] if self.name == "podman" else ["docker", "-H", self.url]
        return subprocess.run([*base, *args], capture_output=True, text=True, check=check)

    def __repr__(self) -> str:
        return self.name

    def state(self, sandbox: str) -> dict[str, object]:
        return json.loads(self("container", "inspect", f"sandboxctl-{sandbox}").stdout)[0]["State"]

    def container_exists(self, sandbox: str) -> bool:
        return self("container", "inspect", f"sandboxctl-{sandbox}", check=False).returncode == 0

    def volume_exists(self, sandbox: str) -> bool:
        return self("volume", "inspect", f"sandboxctl-{sandbox}-workspace", check=False).returncode == 0

    def workspace_path(self, sandbox: str) -> Path:
        """Where the engine keeps the sandbox's workspace volume on this host (tests run as root):
        read there, a file needs no container of the engine's, nor its attach, which under load
        can lose the output of a container that exits at once."""
        volume = f"sandboxctl-{sandbox}-workspace"
        return Path(self("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())

    def remove(self, sandbox: str) -> None:
        self("rm", "-f", f"sandboxctl-{sandbox}", check=False)
        self("volume", "rm", "-f", f"sandboxctl-{sandbox}-workspace", check=False)


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


@pytest.fixture(scope="session")
def docker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    daemon = DockerDaemon(tmp_path_factory.mktemp("docker")).start()
    env = {**os.environ, "DOCKER_HOST": daemon.url, "SKIP_PODMAN": "1"}
    subprocess.run(["bash", str(ROOT / "scripts" / "build-test-image.sh")], check=True, env=env)
    yield daemon.url
    daemon.stop()


@pytest.fixture(scope="session")
def engines(podman_url: str, docker_url: str) -> dict[str, Engine]:
    return {"podman": Engine("podman", podman_url), "docker": Engine("docker", docker_url)}


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, engines: dict[str, Engine]) -> Engine:
    return engines[request.param]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A plain connection to the test's nats-server."""
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
def podman_service(tmp_path: Path, image: str) -> Iterator[PodmanService]:
    """A podman API service of this test's own: stopping it leaves the other tests' engine alone."""
    service = PodmanService(tmp_path / "podman" / "podman.sock").start()
    yield service
    service.stop()


@pytest.fixture
def podman_config(tmp_path: Path, nats_server: NatsServer, podman_url: str) -> Config:
    """A plane on podman alone, for tests that need no second engine."""
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
def nats_config(tmp_path: Path, nats_server: NatsServer) -> Config:
    """A plane's configuration with no engine behind it, for services that drive none: a plane
    without the ``worker`` component (the state machine, projector, query, reaper) needs no more."""
    return Config(
        nats_url=nats_server.url,
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
        drivers=("podman",),
        default_driver="podman",
        actor="test",
    )


@pytest.fixture
def auth_server(tmp_path: Path, store: AuthStore) -> Iterator[NatsServer]:
    """A nats-server that admits only the users of the test module's own ``store`` fixture."""
    server = NatsServer(tmp_path / "nats", auth=store).start()
    yield server
    server.stop()


@pytest.fixture
def config(
    request: pytest.FixtureRequest, tmp_path: Path, nats_server: NatsServer, engines: dict[str, Engine]
) -> Config:
    default = request.getfixturevalue("engine").name if "engine" in request.fixturenames else "podman"
    return Config(
        nats_url=nats_server.url,
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
        podman_url=engines["podman"].url,
        docker_url=engines["docker"].url,
        drivers=ENGINES,
        default_driver=default,
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
def names(engines: dict[str, Engine]) -> Iterator[list[str]]:
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
        for engine in engines.values():
            engine.remove(name)


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


async def phase(cli: CLI, name: str) -> str:
    code, out, err = await cli("get", name, "-o", "json")
    assert code == 0, err
    return str(json.loads(out)["phase"])


async def cli_process(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """The command line in its own process, as a user runs it, with ``env`` as its environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandboxctl.cli",
        *argv,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def run_cli_process(config: Config, *argv: str) -> tuple[int, str, str]:
    """The command line in its own process, against ``config``'s NATS."""
    return await cli_process({**os.environ, "SANDBOXCTL_NATS_URL": config.nats_url}, *argv)


@pytest.fixture
def sandboxes() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB filesystem of the test's own, to fill."""
    mount = tmp_path / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
