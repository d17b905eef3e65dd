"""Supervision: nothing sandboxctl runs may die, hang or linger without someone noticing.

Three layers, each closing one way a control plane used to fail silently:

- **Services in a process** (``Supervisor``): every long-running task of every
  service is watched. A task that ends other than by a stop is logged with its
  exception, and its service is stopped and replaced by a new instance (which
  recovers from the log and its own store), after a backoff. A service that keeps
  failing makes ``Supervisor.fatal`` fire, so the process exits non-zero and an
  outer supervisor (systemd, a container runtime) restarts it whole.
- **Processes ``sandboxctl up`` starts** (``Children``): nats-server and the podman
  service. Each one that exits is reaped at once (never left a zombie), logged and
  started again; one that answers but is unhealthy (``Child.check``) is restarted
  too. Each gets ``PR_SET_PDEATHSIG``, so it dies with ``up`` even when ``up`` is
  killed with SIGKILL, and a pid file whose ``/proc`` command line is checked
  before anything is done to it, so a server left by an ``up`` that died anyway
  (the signal lost) is found and stopped on the next start, and a reused pid is
  never mistaken for it.
- **One ``up`` per data directory** (``DataDirLock``): an advisory lock held for
  the life of the process, released by the kernel however it dies.
- **A process told to stop ends** (``run_to_exit``): what is still running once its
  work is done (a task that ignores its cancellation, a thread stuck in a call) is
  given a bounded time, then named in the log with its stack, and the process exits
  anyway instead of hanging on it.

It also follows nats-server's log (``ServerLogAudit``): the server refuses a
publish or subscription the user's permissions forbid, and logs it; each refusal
becomes a ``DeniedAttempt`` in the audit stream, beside the state machine's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sandboxctl.runtime.config import RESTART_LIMIT, RESTART_WINDOW

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# -- processes -------------------------------------------------------------------------------


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, in the parent: the child, between fork and exec, only calls it.
_PRCTL = _load_prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies, or None.

    The kernel sends the signal when the *thread* that forked the child ends, so it is
    only set for children spawned from the main thread (whose end is the process's);
    from another thread it would kill the child the moment that thread finished."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl, parent = _PRCTL, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: no signal will come
            os.kill(os.getpid(), sig)

    return preexec


def open_log(path: Path) -> int:
    """A child's log file, appended to, readable by its owner only (never through a symlink)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None if there is none (a zombie has an empty one)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] or None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status and "\nState:\tX" not in status


def same_program(found: Sequence[str], argv: Sequence[str]) -> bool:
    """Whether a process's argv is ``argv``: the same arguments and the same program name
    (the program's directory may differ, e.g. a PATH lookup against an absolute path)."""
    return (
        len(found) == len(argv)
        and os.path.basename(found[0]) == os.path.basename(argv[0])
        and list(found[1:]) == list(argv[1:])
    )


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_private(path: Path, text: str) -> None:
    """A small file only its owner may read, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def leftover(pid_path: Path, argv: Sequence[str]) -> int | None:
    """The pid in ``pid_path`` if that process is still running ``argv``: what an earlier run
    started and left behind. A pid the kernel has since given to another program is not it."""
    pid = read_pid(pid_path)
    if pid is None or pid == os.getpid() or not alive(pid):
        return None
    found = cmdline(pid)
    return pid if found is not None and same_program(found, argv) else None


def terminate(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once the process has exited."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is ours
            if not alive(pid):
                return
            time.sleep(0.05)


def end_child(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """End a child this process started: SIGTERM, then SIGKILL after ``timeout``; returns once it
    has exited and is reaped (so it leaves no zombie and Popen knows its exit status)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port``: a bind with SO_REUSEADDR, as nats-server's
    own, fails only then (connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str:
    """Who listens on TCP ``port``, for an error message: ``pid N (argv)``, or "" if unknown."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    wanted = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    argv = cmdline(int(proc.name)) or []
                    return f"pid {proc.name} ({' '.join(argv)[:200]})"
        except OSError:
            continue
    return ""


class DataDirLock:
    """One ``sandboxctl up`` per data directory: an exclusive ``flock`` on ``<data>/up.lock``,
    held while the process lives and released by the kernel however it ends (SIGKILL too).
    The file holds the holder's pid, for the message the next one prints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock; None on success, else the pid of the process holding it (0 if unknown)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return read_pid(self.path) or 0
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- restart policy --------------------------------------------------------------------------


@dataclass
class RestartPolicy:
    """Backoff between restarts, and when to give up: more than ``limit`` failures within
    ``window`` seconds mean restarting in place does not help, and a supervisor outside
    this process (which can start it clean) must take over. A ``limit`` of 0 never gives up:
    for a process nothing else supervises, which keeps trying every ``cap`` seconds."""

    limit: int = RESTART_LIMIT
    window: float = RESTART_WINDOW
    first: float = 0.5
    cap: float = 15.0
    failures: deque[float] = field(default_factory=deque)

    def failed(self, now: float | None = None) -> float | None:
        """Record a failure: the delay before the next attempt, or None to give up."""
        now = time.monotonic() if now is None else now
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window:
            self.failures.popleft()
        if self.limit and len(self.failures) > self.limit:  # 0: never give up
            return None
        return float(min(self.cap, self.first * 2 ** (len(self.failures) - 1)))


def describe(exc: BaseException | None) -> str:
    """One line naming an exception (or a task that returned), for a log line or a health reason."""
    if exc is None:
        return "its task returned"
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- services in this process ------------------------------------------------------------------


class Service(Protocol):
    """What the supervisor relies on, and nothing more: services' internals change."""

    tasks: list[asyncio.Task[None]]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# A factory makes a new instance of a service, not yet started, with the connection it uses
# (closed when the instance is replaced).
Factory = Callable[[], Awaitable[tuple[Service, Any]]]

OK, STARTING, RESTARTING, STOPPED, FAILED = "ok", "starting", "restarting", "stopped", "failed"


@dataclass
class Slot:
    """One service under supervision: its current instance and what happened to it."""

    name: str
    factory: Factory
    policy: RestartPolicy
    service: Any = None
    nc: Any = None
    state: str = STARTING
    reason: str = ""
    restarts: int = 0
    restarting: asyncio.Task[None] | None = None


class Supervisor:
    """Watches every service's ``tasks``; restarts a service whose task ended unasked."""

    def __init__(self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW, interval: float = 0.5) -> None:
        self.limit = limit
        self.window = window
        self.interval = interval
        self.slots: list[Slot] = []
        self.fatal = asyncio.Event()
        self.failure = ""  # why ``fatal`` fired
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def service(self, name: str) -> Any:
        for slot in self.slots:
            if slot.name == name:
                return slot.service
        raise AttributeError(name)

    async def add(self, name: str, factory: Factory) -> Any:
        """Make and start the first instance; a failure here is the caller's (start fails)."""
        slot = Slot(name, factory, RestartPolicy(self.limit, self.window))
        service, nc = await factory()
        slot.service, slot.nc = service, nc
        self.slots.append(slot)
        try:
            await service.start()
        except BaseException:
            self.slots.remove(slot)
            await self._dispose(slot.name, service, nc)
            raise
        self._watch(slot)
        slot.state = OK
        return service

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="supervisor")

    async def stop(self) -> None:
        """Stop watching (nothing is restarted from now on); the services are the caller's to stop."""
        self._stopping = True
        tasks = [t for t in (self._task, *(s.restarting for s in self.slots)) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _watch(self, slot: Slot) -> None:
        for task in list(slot.service.tasks):
            task.add_done_callback(lambda _t: self._wake.set())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            for slot in self.slots:
                if slot.state == OK:
                    self._check(slot)

    def _check(self, slot: Slot) -> None:
        ended = [t for t in slot.service.tasks if t.done()]
        if not ended:
            return
        failed = [t for t in ended if not t.cancelled()]
        if not failed:  # cancelled: someone stopped the service on purpose
            slot.state, slot.reason = STOPPED, "stopped"
            log.warning("%s was stopped; it is not restarted", slot.name)
            return
        task = failed[0]
        exc = task.exception()
        slot.reason = f"task {task.get_name()} ended: {describe(exc)}"
        log.error("%s failed: %s", slot.name, slot.reason, exc_info=exc)
        slot.state = RESTARTING
        slot.restarting = asyncio.create_task(self._restart(slot), name=f"restart-{slot.name}")

    async def _restart(self, slot: Slot) -> None:
        old, old_nc = slot.service, slot.nc
        await self._dispose(slot.name, old, old_nc)
        while not self._stopping:
            delay = slot.policy.failed()
            if delay is None:
                self._give_up(slot)
                return
            log.warning("%s: restarting in %.1fs (restart %d)", slot.name, delay, slot.restarts + 1)
            await asyncio.sleep(delay)
            slot.restarts += 1
            try:
                service, nc = await slot.factory()
            except Exception as exc:
                slot.reason = f"could not make a new instance: {describe(exc)}"
                log.error("%s: %s", slot.name, slot.reason)
                continue
            slot.service, slot.nc = service, nc
            try:
                await service.start()
            except Exception as exc:
                slot.reason = f"start failed: {describe(exc)}"
                log.error("%s: %s", slot.name, slot.reason, exc_info=exc)
                await self._dispose(slot.name, service, nc)
                continue
            self._watch(slot)
            slot.state, slot.reason = OK, ""
            log.warning("%s is back (restart %d)", slot.name, slot.restarts)
            self._wake.set()
            return

    def _give_up(self, slot: Slot) -> None:
        slot.state = FAILED
        self.failure = (
            f"{slot.name} failed {slot.policy.limit + 1} times within {slot.policy.window:g}s "
            f"(last: {slot.reason}); exiting so that an outer supervisor restarts sandboxctl"
        )
        log.error("%s", self.failure)
        self.fatal.set()

    @staticmethod
    async def _dispose(name: str, service: Any, nc: Any) -> None:
        try:
            await asyncio.wait_for(service.stop(), 10)
        except Exception as exc:  # a failed service may fail to stop too: it is dropped all the same
            log.debug("stopping %s: %s", name, describe(exc))
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)


# -- processes sandboxctl up starts ---------------------------------------------------------------


class Child(Protocol):
    """A process ``up`` runs: nats-server, the podman service, the command line's fork server.

    One that fails more than its restarts allow ends ``up`` (so that an outer supervisor starts
    it again), unless it has ``essential = False``: then it is given up alone and logged. Such a
    helper of the host's is not part of the plane's health (``status``)."""

    name: str
    proc: subprocess.Popen[bytes] | None

    def spawn(self) -> None:
        """Start the process (from the main thread: see ``die_with_parent``)."""

    def answers(self) -> bool:
        """Whether it serves (a blocking check, run on a thread)."""

    def stop(self) -> None: ...

    async def check(self) -> str:
        """Why it must be restarted although it runs ("" if it need not)."""


@dataclass
class ChildState:
    child: Any
    policy: RestartPolicy
    restarts: int = 0
    state: str = OK
    reason: str = ""


class Children:
    """Keeps the processes ``up`` started running: each exit is reaped at once, logged and
    followed by a restart (with backoff); a child whose ``check`` asks for it is restarted."""

    def __init__(
        self,
        limit: int = RESTART_LIMIT,
        window: float = RESTART_WINDOW,
        interval: float = 0.5,
        ready_timeout: float = 60.0,
    ) -> None:
        self.limit = limit
        self.window = window
        self.interval = interval
        self.ready_timeout = ready_timeout
        self.states: list[ChildState] = []
        self.fatal = asyncio.Event()
        self.failure = ""
        self._task: asyncio.Task[None] | None = None

    def add(self, child: Child) -> None:
        self.states.append(ChildState(child, RestartPolicy(self.limit, self.window)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="children")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for state in self.states:
                await self._look(state)

    async def _look(self, state: ChildState) -> None:
        child = state.child
        proc = child.proc
        if proc is None:
            return
        code = proc.poll()  # reaps it: an exited child never stays a zombie
        if code is not None:
            why = f"exited with {_exit_status(code)}"
        else:
            try:
                why = await child.check()
            except Exception as exc:
                why = ""
                log.debug("%s check: %s", child.name, describe(exc))
            if not why:
                return
        state.state, state.reason = RESTARTING, why
        log.warning("%s (pid %d) %s; restarting it", child.name, proc.pid, why)
        await self._restart(state)

    async def _restart(self, state: ChildState) -> None:
        child = state.child
        while True:
            await asyncio.to_thread(child.stop)
            delay = state.policy.failed()
            if delay is None and not getattr(child, "essential", True):
                state.state = FAILED
                log.error("%s failed %d times within %gs (last: %s); given up", child.name,
                          state.policy.limit + 1, state.policy.window, state.reason)  # fmt: skip
                return
            if delay is None:
                state.state = FAILED
                self.failure = (
                    f"{child.name} failed {state.policy.limit + 1} times within {state.policy.window:g}s "
                    f"(last: {state.reason}); exiting so that an outer supervisor restarts sandboxctl"
                )
                log.error("%s", self.failure)
                self.fatal.set()
                return
            await asyncio.sleep(delay)
            state.restarts += 1
            try:
                child.spawn()  # on this, the main thread
                await _until_ready(child, self.ready_timeout)
            except Exception as exc:
                state.reason = f"restart failed: {describe(exc)}"
                log.error("%s: %s", child.name, state.reason)
                continue
            assert child.proc is not None
            state.state, state.reason = OK, ""
            log.warning("%s is back (pid %d, restart %d)", child.name, child.proc.pid, state.restarts)
            return


async def _until_ready(child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {_exit_status(proc.returncode if proc else -1)}")
        if await asyncio.to_thread(child.answers):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{child.name} did not answer within {timeout:g}s")


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"


# -- nats-server's log: its refusals, for auditors ---------------------------------------------------

# nats-server's line for a refused publish or subscription (server/client.go, 2.10 to 2.15):
#   [pid] 2026/12/01 11:23:52.759442 [ERR] 127.0.0.1:57710 - cid:5 - "v2.16.0:python3" - "$G/user:reader"
#   - Publish Violation - Subject "sandboxctl.log.x"
# and "Subscription Violation - Subject %q, SID %s" (", Queue: %q" before the SID), "Publish
# Violation - Reply %q". Strings are Go-quoted (%q), so a client's name cannot fake a field.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
VIOLATION = re.compile(
    r"^\[\d+\] (?P<time>\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)?) \[ERR\] .*? - cid:(?P<cid>\d+)"
    rf"(?: - {_QUOTED})*? - \"[^\"/]*/user:(?P<user>[^\"\\]*)\""
    rf" - (?P<kind>Publish|Subscription) Violation - (?P<what>Subject|Reply) (?P<subject>{_QUOTED})"
)


@dataclass(frozen=True)
class Violation:
    time: datetime
    user: str
    action: str  # publish, subscribe or reply
    subject: str
    cid: int


def _unquote(text: str) -> str:
    try:
        return str(json.loads(text))
    except ValueError:  # a Go escape JSON lacks (\x, \a, \v): keep it as written
        return text[1:-1]


def parse_violation(line: str) -> Violation | None:
    """A refusal nats-server logged (its log times are UTC: ``logtime_utc``), or None."""
    match = VIOLATION.match(line)
    if match is None:
        return None
    action = {"Subscription": "subscribe", "Publish": "publish"}[match["kind"]]
    if match["what"] == "Reply":
        action = "reply"
    stamp = datetime.strptime(match["time"], "%Y/%m/%d %H:%M:%S.%f" if "." in match["time"] else "%Y/%m/%d %H:%M:%S")
    return Violation(stamp.replace(tzinfo=UTC), match["user"], action, _unquote(match["subject"]), int(match["cid"]))


class ServerLogAudit:
    """Follows nats-server's log and records each refusal it logs as a DeniedAttempt.

    Where it has read up to is kept beside the log (``offset_path``: inode and offset), so a
    restarted ``up`` goes on where the last one stopped instead of recording a line twice
    or losing one; a record is also published with a ``Nats-Msg-Id`` derived from the line.
    Identical refusals read together (a client looping on a forbidden subject) are recorded
    once, with their count, so a flood cannot grow the audit stream line for line."""

    def __init__(
        self,
        log_path: Path,
        offset_path: Path,
        record: Callable[[Violation, int], Awaitable[None]],
        interval: float = 0.25,
    ) -> None:
        self.log_path = log_path
        self.offset_path = offset_path
        self.record = record
        self.interval = interval
        self.recorded = 0
        self._task: asyncio.Task[None] | None = None

    def mark_start(self) -> None:
        """With no saved position, begin where the log ends now: call before the server starts,
        so what it logs from then on is read, and nothing an earlier, unaudited run logged."""
        if self._saved() is None:
            try:
                st = self.log_path.stat()
            except OSError:
                self._save(0, 0)
                return
            self._save(st.st_ino, st.st_size)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="server-log-audit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _saved(self) -> tuple[int, int] | None:
        try:
            inode, offset = (int(x) for x in self.offset_path.read_text().split())
        except (OSError, ValueError):
            return None
        return inode, offset

    def _save(self, inode: int, offset: int) -> None:
        with contextlib.suppress(OSError):  # a full disk: read again next time, deduplicated
            write_private(self.offset_path, f"{inode} {offset}\n")

    async def _run(self) -> None:
        said = ""
        while True:
            try:
                await self.read_once()
                said = ""
            except Exception as exc:
                problem = describe(exc)
                if problem != said:  # once per problem, not once a second
                    log.warning("auditing nats-server's refusals: %s; trying again", problem)
                    said = problem
                await asyncio.sleep(1)
            await asyncio.sleep(self.interval)

    async def read_once(self) -> int:
        """Record the refusals logged since the last read; how many lines were recorded."""
        try:
            st = self.log_path.stat()
        except OSError:
            return 0
        inode, offset = self._saved() or (st.st_ino, 0)
        if inode != st.st_ino or offset > st.st_size:  # a new log file: read it from the start
            inode, offset = st.st_ino, 0
        if offset == st.st_size:
            return 0
        with self.log_path.open("rb") as f:
            f.seek(offset)
            chunk = f.read(4 * 2**20)
        end = chunk.rfind(b"\n") + 1  # whole lines only
        if end == 0:
            return 0
        groups: dict[tuple[str, str, str], list[Violation]] = {}
        for line in chunk[:end].decode(errors="replace").splitlines():
            found = parse_violation(line)
            if found is not None:
                groups.setdefault((found.user, found.action, found.subject), []).append(found)
        for same in groups.values():
            await self.record(same[0], len(same))  # raises, and the lines are read again, if it fails
        self.recorded += sum(len(v) for v in groups.values())
        self._save(inode, offset + end)
        return sum(len(v) for v in groups.values())


def denied_attempt(violation: Violation, count: int, roles: Iterable[str] | None) -> Any:
    """The audit record of a refusal nats-server made: who, which subject, and why."""
    from sandboxctl.events import subjects
    from sandboxctl.events.denied import DeniedAttempt

    tokens = violation.subject.split(".")
    sandbox = ""
    if len(tokens) == 3 and f"{tokens[0]}.{tokens[1]}" in (subjects.LOG, subjects.FACTS, subjects.PROJECTED):
        sandbox = tokens[2][:63]
    times = f" ({count} times)" if count > 1 else ""
    stamp = violation.time.isoformat()
    return DeniedAttempt(
        id=f"server:{violation.user}:{violation.cid}:{stamp}:{violation.action}:{violation.subject[:200]}",
        time=stamp,
        user=violation.user or "_",
        action=violation.action,
        sandbox=sandbox,
        subject=violation.subject[:200],
        required=_required(violation.subject),
        roles=list(roles or []),
        reason=(
            f"nats-server refused {violation.action} on {violation.subject[:200]}{times}: "
            f"user {violation.user} has no permission for it"
        ),
    )


def _required(subject: str) -> str:
    """Who may use ``subject``, as far as the audit record needs to say."""
    from sandboxctl.events import subjects

    if subject.startswith(f"{subjects.LOG}."):
        return "sandboxctl-statemachine (the only log writer)"
    if subject.startswith(f"{subjects.FACTS}."):
        return "sandboxctl-driver-* (the only fact writers)"
    if subject.startswith(f"{subjects.COMMANDS}."):
        return "its own user (sandboxctl.cmd.<verb>.<user>)"
    if subject.startswith("$JS.API."):
        return "a role or service that uses this stream"
    return "a permission the user does not have"
