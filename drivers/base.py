"""The driver contract every engine implements, and what both engines share.

Podman and docker speak the same API for everything sandboxctl does (podman's
follows docker's), so the operations themselves (ownership, create, start,
stop, delete, exec, logs) live here once, in ``EngineDriver``; each driver
supplies only its engine's primitives: an inspect, a start, a stop, the volume
calls and the like, with its SDK's errors mapped to ``DriverError``.

**Ownership.** A sandbox's container and workspace volume carry its id in the
``sandboxctl.sandbox_id`` label. Every operation acts only on a container or
volume whose label equals the sandbox's id: never on one made by hand under the
same name, nor on a container that merely mounts the workspace, nor on what a
later sandbox of the same name owns. For the sandbox such a container is no
container at all (``ContainerMissing``). A container's labels cannot change, so
once a container id has been seen with the right label, the driver addresses
it by that id (``_ids``): start and stop then cost no extra engine call, and a
container removed and made again by hand under the name is a different id.

**Exec.** Both engines serve docker's exec endpoints; ``EngineHTTP`` speaks them
on the engine's socket, since neither SDK can stream standard input and then
half-close it, which is how a command such as ``cat`` learns that its input has
ended. When the client goes away (a signal, a closed output pipe), the command
and everything it started are ended, not left running unseen: every process of
an exec carries ``SANDBOXCTL_EXEC_ID=<random>`` in its environment, inherited
by children and daemons alike, so they are found by that mark (never by a PID
that may have been reused, and including processes reparented away from the
exec's own) and signalled from the host, where the CLI runs; where the host
cannot see or signal them (another PID namespace, another user), a second exec
does it inside the container. Neither engine has an API to signal an exec.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Protocol
from urllib.parse import quote, urlsplit

import msgspec

from sandboxctl.events import limits
from sandboxctl.events.spec import NO_RESOURCES, Resources

log = logging.getLogger(__name__)

MANAGED = "sandboxctl.managed"
WORKSPACE = "/workspace"  # where a sandbox's workspace volume is mounted, and its working directory
SANDBOX = "sandboxctl.sandbox"
SANDBOX_ID = "sandboxctl.sandbox_id"

EXEC_SETTLE = 2.0  # seconds to wait for an engine to record an exec's exit code once its output ends
# A stop's grace is clamped to [0, GRACE_MAX] (events.limits.GRACE_MAX bounds the command too); a grace
# that is not a number is the default. No value can make a driver raise before the engine is asked.
GRACE_MAX = int(limits.GRACE_MAX)
GRACE_DEFAULT = 10
# A stop that overlaps another stop of the same container ends, by SIGKILL, at most this long after
# its own grace, whatever the engine does with two stops at once (podman 4.3 and docker 20.10 honour
# the shorter grace themselves: measured 1.2 s and 1.0 s for a grace of 1).
STOP_KILL_MARGIN = 2.0
# An exec's processes carry this variable, with a value of the exec's own, so that all of them
# (children and daemons too) can be found and ended when the client goes away, and nothing else.
EXEC_ID_ENV = "SANDBOXCTL_EXEC_ID"
EXEC_KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for an abandoned exec's processes
# runc's freezer gives up ("unable to freeze") when the container's processes fork while it freezes
# them, and thaws them again: the pause is tried this many times, this far apart, before it fails.
PAUSE_TRIES = 3
PAUSE_RETRY_DELAY = 0.2
CHUNK = 64 * 1024  # standard input is forwarded in chunks of this size, never read whole


def container_name(sandbox: str) -> str:
    return f"sandboxctl-{sandbox}"


def volume_name(sandbox: str) -> str:
    return f"sandboxctl-{sandbox}-workspace"


def labels_for(sandbox: str, sandbox_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**(extra or {}), MANAGED: "true", SANDBOX: sandbox, SANDBOX_ID: sandbox_id}


def owned_by(labels: dict[str, str] | None, sandbox_id: str) -> bool:
    """Whether a container or volume may be acted on for sandbox ``sandbox_id``: only if its
    ``sandboxctl.sandbox_id`` label is that id.

    Names are reused and anyone can make a container or volume under a sandbox's name (or mount
    its workspace), so a name proves nothing. An empty ``sandbox_id`` matches nothing (a caller
    that does not know whose sandbox it acts for may not act), and neither does an unlabelled object."""
    return bool(sandbox_id) and (labels or {}).get(SANDBOX_ID, "") == sandbox_id


def foreign_workspace(volume: str, labels: dict[str, str] | None, sandbox_id: str) -> DriverError | None:
    """The error for a create that finds the name's workspace volume not labelled for its sandbox
    (another sandbox's, or made by hand): its files are not this sandbox's to take."""
    if owned_by(labels, sandbox_id):
        return None
    owner = (labels or {}).get(SANDBOX_ID, "") or "(none)"
    return DriverError("create", f"workspace volume {volume} already exists and belongs to sandbox id {owner}")


def grace_seconds(timeout: float) -> int:
    """A stop's grace as the whole seconds engines take: never negative, at most GRACE_MAX, the
    default for NaN; ``round`` of an infinity would raise, and an engine refuses absurd numbers."""
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        return GRACE_DEFAULT
    if math.isnan(value):
        return GRACE_DEFAULT
    return round(min(max(value, 0.0), float(GRACE_MAX)))


class SandboxSpec(msgspec.Struct, kw_only=True):
    name: str
    sandbox_id: str
    image: str
    command: list[str] | None = None
    labels: dict[str, str] = {}
    resources: Resources = NO_RESOURCES
    env: dict[str, str] = {}


CPU_PERIOD = 100_000  # microseconds: the CFS period a CPU quota is a share of (the engines' default)


def made_with(have: Resources, wanted: Resources) -> bool:
    """Whether a container made with ``have`` enforces each limit ``wanted`` names (an engine
    may set limits of its own, such as podman's default pids limit, that nobody asked for)."""
    return (
        (wanted.cpus is None or (have.cpus is not None and abs(have.cpus - wanted.cpus) < 0.001))
        and (wanted.memory is None or have.memory == wanted.memory)
        and (wanted.pids is None or have.pids == wanted.pids)
    )


def resource_settings(resources: Resources) -> dict[str, Any]:
    """The container settings, as both SDKs name them, that make the engine enforce ``resources``:
    a CFS quota for CPUs (both engines take it; podman's SDK ignores ``nano_cpus``), a memory
    limit with as much swap (none beyond it), and a pids limit."""
    settings: dict[str, Any] = {}
    if resources.cpus is not None:
        settings["cpu_period"] = CPU_PERIOD
        settings["cpu_quota"] = max(1000, round(resources.cpus * CPU_PERIOD))
    if resources.memory is not None:
        settings["mem_limit"] = resources.memory
        settings["memswap_limit"] = resources.memory
    if resources.pids is not None:
        settings["pids_limit"] = resources.pids
    return settings


class ContainerInfo(msgspec.Struct, kw_only=True):
    sandbox: str
    sandbox_id: str
    container_id: str
    running: bool  # its process is alive: running, paused, or still stopping
    status: str
    exit_code: int = 0
    oom: bool = False
    incarnation: str = ""  # the engine's start time of the current or last run
    stopping: bool = False  # a stop is under way (podman's "stopping"): alive, and about to exit
    paused: bool = False  # frozen by the engine: alive (``running``), using no CPU
    resources: Resources = NO_RESOURCES  # the limits the container was made with (0 or absent: none)


def container_info(attrs: dict[str, Any]) -> ContainerInfo:
    """A container as both engines' inspect output describes it (podman's follows docker's).

    Podman reports a container in a stop's grace period as ``Status: stopping`` with
    ``Running: false`` while its process is still alive; it is running (and stopping) here,
    never exited: an exit is only what the engine reports once the process is gone."""
    state = attrs.get("State", {})
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    started = state.get("StartedAt", "")
    status = str(state.get("Status", ""))
    stopping = status == "stopping"
    # Podman shows a paused container as not Running; it is alive all the same.
    paused = bool(state.get("Paused")) or status == "paused"
    host = attrs.get("HostConfig") or {}
    quota, period, nano = host.get("CpuQuota") or 0, host.get("CpuPeriod") or CPU_PERIOD, host.get("NanoCpus") or 0
    cpus = nano / 1e9 if nano else (quota / period if quota > 0 else None)
    return ContainerInfo(
        sandbox=labels.get(SANDBOX, ""),
        sandbox_id=labels.get(SANDBOX_ID, ""),
        container_id=attrs.get("Id", ""),
        running=bool(state.get("Running")) or stopping or paused,
        status=status,
        exit_code=int(state.get("ExitCode") or 0),
        oom=bool(state.get("OOMKilled")),
        incarnation="" if started.startswith("0001-") else str(started),
        stopping=stopping,
        paused=paused,
        resources=Resources(
            cpus=cpus,
            memory=int(host.get("Memory") or 0) or None,
            pids=int(host.get("PidsLimit") or 0) if (host.get("PidsLimit") or 0) > 0 else None,
        ),
    )


def exec_command(engine: list[str], container: str, command: list[str], tty: bool) -> list[str]:
    """The engine CLI's command line (``engine``: the program and its connection flags) that
    runs ``command`` in ``container`` (an id: a name could be anyone's) attached to this terminal."""
    return [*engine, "exec", "-i", *(["-t"] if tty else []), container, *command]


class EngineEvent(msgspec.Struct, kw_only=True):
    """A change the engine reports for a managed container."""

    action: str  # "start", "die", "pause", "unpause", "remove"
    sandbox: str
    container_id: str
    sandbox_id: str = ""
    exit_code: int | None = None
    time_ns: int = 0  # when the engine says it happened: a pause or a thaw repeats within one run


class DriverError(Exception):
    """The engine could not do what was asked; ``str()`` is the engine's message."""

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.message = message


class ContainerMissing(DriverError):
    """The sandbox's container is not there: gone, or only a container that is not the sandbox's."""


class EngineTimeout(DriverError):
    """The engine took the request and did not answer in time (a read timeout): unlike a refused
    connection, it may still carry the request out, so the outcome is unknown until it answers."""


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: the SDKs wrap requests' and urllib3's errors) is a read
    timeout. A connect timeout is not: the engine never got the request."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = type(current).__name__
        if kind in ("ConnectTimeout", "ConnectTimeoutError", "NewConnectionError"):
            return False
        if kind in ("ReadTimeout", "ReadTimeoutError") or isinstance(current, TimeoutError):
            return True
        current = current.__cause__ or current.__context__
    return False


def sdk_message(exc: BaseException) -> str:
    """What an engine SDK's error says: the engine's own message (the SDKs' ``explanation``)
    where there is one, so the user reads the engine's words, never only a status line."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__


# What the engines say of a container or volume they have not: docker's "no such container",
# podman's, and podman's storage layer's "container not known" for one whose record is gone
# while the container's entry still lists it (a run cut short): all as gone as a 404.
GONE = ("no such container", "no such volume", "container not known")


def engine_failure(operation: str, exc: BaseException, message: str) -> DriverError:
    """The DriverError an engine SDK's failure stands for, the same for every engine: a container
    or volume the engine says it has not is ContainerMissing (one removed while the engine
    resolves its name answers 409 or 500, not 404, and is just as gone), a read timeout is
    EngineTimeout (the engine may still carry it out), anything else a DriverError."""
    lowered = message.lower()
    if any(gone in lowered for gone in GONE):
        return ContainerMissing(operation, message)
    if timed_out(exc):
        cause = exc.__cause__
        return EngineTimeout(operation, f"{message}: {cause}" if cause is not None else message)
    return DriverError(operation, message)


def untimed(response: Any) -> None:
    """Lift the read timeout from a streaming response once the engine has answered: the
    timeout is for the engine's answer, a followed log may then be silent for as long as it likes.
    (The docker SDK does the same for its own streams.)"""
    with contextlib.suppress(AttributeError, OSError):
        response.raw._fp.fp.raw._sock.settimeout(None)


class Endable(Protocol):
    """A running exec that another thread can end (an engine's stream, a VM's console session)."""

    def end(self) -> None: ...


class ExecControl:
    """Lets another thread end an exec that ``Driver.exec`` is running (a signal, a closed pipe):
    ``abort`` ends the exec's processes in the container and then its stream, so the exec call
    returns. An abort before the exec has started ends it as soon as it starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: Endable | None = None
        self.aborted = False

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            run = self._run
        if run is not None:
            run.end()

    def _attach(self, run: Endable) -> None:
        with self._lock:
            self._run = run
            aborted = self.aborted
        if aborted:
            run.end()


def refuse_if_aborted(control: ExecControl | None) -> None:
    """DriverError if the exec was ended before it started (its ``ExecControl`` aborted already):
    every driver's exec begins here, so no command starts for a caller that has gone."""
    if control is not None and control.aborted:
        raise DriverError("exec", "ended before it started")


def tell_launched(launched: Callable[[], None] | None) -> None:
    """Call a start's ``launched`` (see Driver.start): what it does is the caller's, and never
    fails the start, which is under way."""
    if launched is None:
        return
    try:
        launched()
    except Exception:
        log.exception("a start's launched callback failed; the start goes on")


class Driver(Protocol):
    name: str
    # How many operations the engine takes at once before it serialises them and
    # callers start timing out: the driver worker never runs more at a time.
    parallelism: int
    # Seconds each engine call may take to be answered (a stop: its grace on top). Settable
    # before first use: the CLI gives exec and logs a bound of their own this way.
    timeout: float

    def ping(self) -> None: ...
    def prepare(self) -> None:
        """Called once by the worker that will drive this engine, before its first order: work
        done ahead for creates to come (the vm driver's blank disks), which a driver made for
        one call (the CLI's exec, logs, copy) never does. Returns at once; the work goes on on
        the driver's own thread until ``close``."""
        ...

    def create(self, spec: SandboxSpec) -> ContainerInfo:
        """Make the container (and the workspace volume unless the sandbox's is there), not started.
        Refuses a container or volume of that name that is not the sandbox's."""
        ...

    def start(self, sandbox: str, sandbox_id: str, launched: Callable[[], None] | None = None) -> ContainerInfo:
        """Start the sandbox's container; ContainerMissing if it has none (whatever else has its name).
        ``launched``, when given, is called (on the calling thread) when the start is under
        way and before it is done, so that what waits on the start may go on meanwhile: a
        container engine's as its start call is made, a VM's once its qemu runs (the guest then
        boots for seconds), so that nothing the caller does meanwhile delays the launch. It is
        not called for a start that has nothing to do or fails before that point, and may be
        called again when the start is tried again."""
        ...

    def stop(self, sandbox: str, sandbox_id: str, timeout: float) -> ContainerInfo:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the container has exited. A
        second stop while one is under way ends it after the second's grace if that is sooner. A
        paused container is thawed to be stopped."""
        ...

    def pause(self, sandbox: str, sandbox_id: str) -> ContainerInfo:
        """Freeze the sandbox's running container (memory kept); pausing a paused one succeeds. A
        container that does not run cannot be paused: DriverError with its state."""
        ...

    def resume(self, sandbox: str, sandbox_id: str) -> ContainerInfo:
        """Thaw the sandbox's paused container; resuming one that is not paused succeeds."""
        ...

    def remake(self, spec: SandboxSpec) -> ContainerInfo:
        """Make the sandbox's own container again from ``spec`` on its workspace; made, not started."""
        ...

    def delete(self, sandbox: str, sandbox_id: str) -> str:
        """Remove the container and its workspace volume if they belong to ``sandbox_id``; returns the
        removed container's id ("" if there was none). Removing what is gone succeeds. A container
        that is not the sandbox's and uses the workspace makes it fail, touching nothing."""
        ...

    def inspect(self, sandbox: str, sandbox_id: str) -> ContainerInfo | None:
        """The sandbox's container, or None if there is none (a container of another id is none)."""
        ...

    def workspace(self, sandbox: str, sandbox_id: str) -> bool:
        """Whether the sandbox's workspace volume (labelled with its id) is there."""
        ...

    def list_managed(self) -> list[ContainerInfo]: ...
    def events(self, since: float | None = None) -> Iterator[EngineEvent]:
        """Follow the engine's changes to managed containers, replaying those since ``since`` (a Unix time)."""
        ...

    def exec(
        self,
        sandbox: str,
        sandbox_id: str,
        command: list[str],
        output: Callable[[int, bytes], None],
        stdin: IO[bytes] | None = None,
        control: ExecControl | None = None,
    ) -> int:
        """Run ``command`` in the running container (in its working directory, without a tty),
        handing its output to ``output(fd, chunk)`` (1 stdout, 2 stderr) as it comes; returns
        its exit code. Blocks until the command ends. With ``stdin`` its bytes are the command's
        standard input, streamed in chunks, closed when they end. If ``output`` raises (a closed
        pipe) or ``control`` aborts, the command and everything it started are ended first."""
        ...

    def logs(
        self, sandbox: str, sandbox_id: str, tail: int | None = None, since: float | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        """The container's output (stdout and stderr, as the engine stored it): the last ``tail``
        lines, from ``since`` (a Unix time); with ``follow``, until the container stops."""
        ...

    def path_stat(self, sandbox: str, sandbox_id: str, path: str) -> dict[str, Any] | None:
        """What ``path`` is in the sandbox's container (``name``, ``size``, ``mode``, ``linkTarget``,
        as the engines' archive API states it), or None if nothing is there. Works on a container
        that does not run: its workspace volume is reached all the same."""
        ...

    def copy_in(self, sandbox: str, sandbox_id: str, directory: str, archive: Iterable[bytes]) -> None:
        """Unpack a tar ``archive``, streamed in chunks, into ``directory`` of the sandbox's container."""
        ...

    def copy_out(self, sandbox: str, sandbox_id: str, path: str) -> Iterator[bytes]:
        """A tar archive of ``path`` in the sandbox's container, streamed in chunks."""
        ...

    def copy_workspace(self, source: str, source_id: str, sandbox: str, sandbox_id: str) -> None:
        """Copy sandbox ``source``'s workspace, whole and exact (modes, links, times), into sandbox
        ``sandbox``'s (its container made): streamed from one container's archive to the other's."""
        ...

    def interactive(self, sandbox: str, sandbox_id: str, command: list[str], tty: bool) -> list[str]:
        """The engine's own command line that runs ``command`` in the container attached to the
        caller's terminal: terminal modes and resizes are the engine client's business."""
        ...

    def close(self) -> None: ...


# -- what both engines share ---------------------------------------------------------


class EngineDriver:
    """The operations of the driver contract, on an engine's primitives (see the subclasses).

    Primitives raise ``ContainerMissing`` for a container or volume that is not there,
    ``EngineTimeout`` for an engine that took a request and did not answer, and
    ``DriverError`` for the rest, each with the engine's message."""

    name = ""
    parallelism = 1

    def prepare(self) -> None:
        """Nothing: an engine's containers and volumes are made at create."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url
        self.timeout = timeout
        # sandbox name -> (sandbox id, container id) of containers seen carrying that id
        self._ids: dict[str, tuple[str, str]] = {}
        self._stops: dict[str, int] = {}  # container id -> stops of it under way in this driver
        self._stops_lock = threading.Lock()

    # -- primitives -------------------------------------------------------------------

    def _inspect(self, operation: str, ref: str) -> dict[str, Any]:
        raise NotImplementedError

    def _start(self, container_id: str) -> None:
        raise NotImplementedError

    def _stop(self, container_id: str, grace: int) -> None:
        raise NotImplementedError

    def _kill(self, container_id: str) -> None:
        raise NotImplementedError

    def _pause(self, container_id: str) -> None:
        raise NotImplementedError

    def _unpause(self, operation: str, container_id: str) -> None:
        raise NotImplementedError

    def _remove(self, container_id: str) -> None:
        raise NotImplementedError

    def _volume_labels(self, operation: str, sandbox: str) -> dict[str, str] | None:
        raise NotImplementedError

    def _make_volume(self, volume: str, labels: dict[str, str]) -> None:
        raise NotImplementedError

    def _remove_volume(self, volume: str) -> None:
        raise NotImplementedError

    def _volume_users(self, volume: str) -> list[tuple[str, dict[str, str]]]:
        """(name, labels) of every container, running or not, that mounts ``volume``."""
        raise NotImplementedError

    def _make_container(self, image: str, settings: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _api_prefix(self, operation: str) -> str:
        """The path prefix of the engine's API that exec speaks (``/v1.41``, ``/v5.0.0/libpod``)."""
        raise NotImplementedError

    def _log_stream(self, container_id: str, tail: int | None, since: float | None, follow: bool) -> Iterator[bytes]:
        raise NotImplementedError

    def _engine_cli(self) -> list[str]:
        raise NotImplementedError

    # -- ownership --------------------------------------------------------------------

    def _remember(self, sandbox: str, info: ContainerInfo) -> None:
        if info.sandbox_id and info.container_id:
            self._ids[sandbox] = (info.sandbox_id, info.container_id)

    def _forget(self, sandbox: str) -> None:
        self._ids.pop(sandbox, None)

    def _own(self, operation: str, sandbox: str, sandbox_id: str) -> str:
        """The id of the sandbox's container, found by name and checked by label; ContainerMissing
        if the name is free or taken by a container that is not the sandbox's."""
        if not sandbox_id:
            raise ContainerMissing(operation, f"no sandbox id given for {sandbox}: no container is its without one")
        info = container_info(self._inspect(operation, container_name(sandbox)))
        if info.sandbox_id != sandbox_id:
            raise ContainerMissing(
                operation,
                f"container {container_name(sandbox)} is not sandbox {sandbox}'s (it carries sandbox id "
                f"{info.sandbox_id or '(none)'}, not {sandbox_id}); sandbox {sandbox} has no container",
            )
        self._remember(sandbox, info)
        return info.container_id

    def _on_own(
        self, operation: str, sandbox: str, sandbox_id: str, act: Callable[[str], ContainerInfo]
    ) -> ContainerInfo:
        """``act(container id)`` on the sandbox's container: by the id seen before if there is one
        (no extra engine call), else by the id found by name and label. An id that has gone is
        looked up by name once more, so a container made again by sandboxctl is found."""
        known = self._ids.get(sandbox)
        if known is not None and known[0] == sandbox_id:
            try:
                return act(known[1])
            except ContainerMissing:
                self._forget(sandbox)
        try:
            return act(self._own(operation, sandbox, sandbox_id))
        except ContainerMissing:
            self._forget(sandbox)
            raise

    def _info(self, operation: str, container_id: str) -> ContainerInfo:
        return container_info(self._inspect(operation, container_id))

    # -- the contract ---------------------------------------------------------------------

    def inspect(self, sandbox: str, sandbox_id: str) -> ContainerInfo | None:
        try:
            info = container_info(self._inspect("inspect", container_name(sandbox)))
        except ContainerMissing:
            return None
        if not sandbox_id or info.sandbox_id != sandbox_id:
            return None
        self._remember(sandbox, info)
        return info

    def workspace(self, sandbox: str, sandbox_id: str) -> bool:
        try:
            return owned_by(self._volume_labels("inspect", sandbox), sandbox_id)
        except ContainerMissing:
            return False

    def create(self, spec: SandboxSpec) -> ContainerInfo:
        # Looked up as part of "create", so an unreachable engine fails the create, not an inspect nobody asked for.
        try:
            existing: ContainerInfo | None = container_info(self._inspect("create", container_name(spec.name)))
        except ContainerMissing:
            existing = None
        if existing is not None:
            if existing.sandbox_id != spec.sandbox_id or not spec.sandbox_id:
                raise DriverError(
                    "create",
                    f"container {container_name(spec.name)} already exists and belongs to sandbox id "
                    f"{existing.sandbox_id or '(none)'}",
                )
            self._remember(spec.name, existing)
            return existing
        labels = labels_for(spec.name, spec.sandbox_id, spec.labels)
        volume = volume_name(spec.name)
        try:
            problem = foreign_workspace(volume, self._volume_labels("create", spec.name), spec.sandbox_id)
            if problem is not None:
                raise problem
        except ContainerMissing:
            # Made here rather than left to the container's mount, which would make it too, but without the labels.
            self._make_volume(volume, labels)
        settings: dict[str, Any] = {
            "name": container_name(spec.name),
            "labels": labels,
            "volumes": {volume: {"bind": WORKSPACE, "mode": "rw"}},
            "network_mode": "none",
            "hostname": spec.name,
        }
        if spec.command:
            settings["command"] = spec.command
        if spec.env:
            settings["environment"] = dict(spec.env)
        settings.update(resource_settings(spec.resources))
        info = container_info(self._make_container(spec.image, settings))
        self._remember(spec.name, info)
        return info

    # Start and stop address the container by its id and inspect once after: two engine calls,
    # as many as by name. Engines answer 304 for a container already in that state.

    def start(self, sandbox: str, sandbox_id: str, launched: Callable[[], None] | None = None) -> ContainerInfo:
        def act(container_id: str) -> ContainerInfo:
            tell_launched(launched)
            self._start(container_id)
            return self._info("start", container_id)

        return self._on_own("start", sandbox, sandbox_id, act)

    def stop(self, sandbox: str, sandbox_id: str, timeout: float) -> ContainerInfo:
        grace = grace_seconds(timeout)

        def act(container_id: str) -> ContainerInfo:
            with self._stopping(container_id, grace):
                try:
                    self._stop(container_id, grace)
                except ContainerMissing:
                    raise
                except DriverError:
                    # Podman refuses to stop a paused container (docker thaws it itself): thaw it
                    # and stop again. Looked at only when the stop failed, so a stop costs nothing more.
                    if not self._info("stop", container_id).paused:
                        raise
                    self._unpause("stop", container_id)
                    self._stop(container_id, grace)
            return self._info("stop", container_id)

        return self._on_own("stop", sandbox, sandbox_id, act)

    def pause(self, sandbox: str, sandbox_id: str) -> ContainerInfo:
        def act(container_id: str) -> ContainerInfo:
            info = self._info("pause", container_id)
            if info.paused:
                return info
            if not info.running or info.stopping:
                raise DriverError(
                    "pause", f"container {container_name(sandbox)} is {info.status or 'not running'}: nothing to pause"
                )
            for tries_left in reversed(range(PAUSE_TRIES)):
                try:
                    self._pause(container_id)
                    break
                except ContainerMissing:
                    raise
                except DriverError:
                    info = self._info("pause", container_id)
                    if info.paused:
                        return info
                    if not tries_left or not info.running or info.stopping:
                        raise
                    time.sleep(PAUSE_RETRY_DELAY)
            return self._info("pause", container_id)

        return self._on_own("pause", sandbox, sandbox_id, act)

    def resume(self, sandbox: str, sandbox_id: str) -> ContainerInfo:
        def act(container_id: str) -> ContainerInfo:
            info = self._info("resume", container_id)
            if not info.paused:
                return info
            self._unpause("resume", container_id)
            return self._info("resume", container_id)

        return self._on_own("resume", sandbox, sandbox_id, act)

    @contextlib.contextmanager
    def _stopping(self, container_id: str, grace: int) -> Iterator[None]:
        """Count a stop under way; one that overlaps another (a shorter grace asked while the
        first waits) makes sure of its own deadline with a SIGKILL, should the engine keep to the
        first stop's. A lone stop costs no thread: the engine keeps its grace."""
        with self._stops_lock:
            overlapping = self._stops.get(container_id, 0) > 0
            self._stops[container_id] = self._stops.get(container_id, 0) + 1
        timer = None
        if overlapping:
            timer = threading.Timer(grace + STOP_KILL_MARGIN, self._kill_quietly, (container_id,))
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            with self._stops_lock:
                left = self._stops.get(container_id, 1) - 1
                if left > 0:
                    self._stops[container_id] = left
                else:
                    self._stops.pop(container_id, None)

    def _kill_quietly(self, container_id: str) -> None:
        with contextlib.suppress(DriverError):
            self._kill(container_id)

    def remake(self, spec: SandboxSpec) -> ContainerInfo:
        """Make the sandbox's container again from ``spec`` (new resources), on the same workspace:
        its own container is removed (never another's: ContainerMissing if the name is not its),
        the workspace volume is kept, and the new container is made, not started."""

        def act(container_id: str) -> ContainerInfo:
            self._remove(container_id)
            return ContainerInfo(
                sandbox=spec.name, sandbox_id=spec.sandbox_id, container_id="", running=False, status=""
            )

        self._on_own("update", spec.name, spec.sandbox_id, act)
        self._forget(spec.name)
        return self.create(spec)

    def delete(self, sandbox: str, sandbox_id: str) -> str:
        volume = volume_name(sandbox)
        try:
            ours = owned_by(self._volume_labels("delete", sandbox), sandbox_id)
        except ContainerMissing:
            ours = False
        if ours:
            # Refuse before anything is touched: removing the volume would need the other
            # container gone, and that container is not ours to remove.
            others = [name for name, labels in self._volume_users(volume) if not owned_by(labels, sandbox_id)]
            if others:
                raise DriverError(
                    "delete",
                    f"workspace volume {volume} is in use by container {', '.join(sorted(others))}, which is not "
                    f"sandbox {sandbox}'s; sandboxctl leaves it alone: remove it, then delete again",
                )
        container_id = ""
        try:
            info = container_info(self._inspect("delete", container_name(sandbox)))
            if sandbox_id and info.sandbox_id == sandbox_id:
                container_id = info.container_id
                self._remove(container_id)
        except ContainerMissing:
            pass
        self._forget(sandbox)
        if ours:
            try:
                # Never forced: an engine that finds the volume in use refuses, and says by what.
                self._remove_volume(volume)
            except ContainerMissing:
                pass
        return container_id

    def exec(
        self,
        sandbox: str,
        sandbox_id: str,
        command: list[str],
        output: Callable[[int, bytes], None],
        stdin: IO[bytes] | None = None,
        control: ExecControl | None = None,
    ) -> int:
        refuse_if_aborted(control)
        container_id = self._own("exec", sandbox, sandbox_id)
        http = self._http("exec")
        token = secrets.token_hex(16)
        made = http.request(
            "exec",
            "POST",
            f"/containers/{container_id}/exec",
            {
                "Cmd": command,
                "AttachStdin": stdin is not None,
                "AttachStdout": True,
                "AttachStderr": True,
                "Tty": False,
                "Env": [f"{EXEC_ID_ENV}={token}"],
            },
        )
        exec_id = str(made["Id"])
        sock, early = http.upgrade("exec", f"/exec/{exec_id}/start", {"Detach": False, "Tty": False})
        run = _ExecRun(self, http, container_id, exec_id, token, sock)
        if control is not None:
            control._attach(run)
        return run.wait(output, stdin, early)

    def logs(
        self, sandbox: str, sandbox_id: str, tail: int | None = None, since: float | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        yield from self._log_stream(self._own("logs", sandbox, sandbox_id), tail, since, follow)

    def interactive(self, sandbox: str, sandbox_id: str, command: list[str], tty: bool) -> list[str]:
        return exec_command(self._engine_cli(), self._own("exec", sandbox, sandbox_id), command, tty)

    def path_stat(self, sandbox: str, sandbox_id: str, path: str) -> dict[str, Any] | None:
        return self._http("copy").path_stat("copy", self._own("copy", sandbox, sandbox_id), path)

    def copy_in(self, sandbox: str, sandbox_id: str, directory: str, archive: Iterable[bytes]) -> None:
        self._http("copy").upload("copy", self._own("copy", sandbox, sandbox_id), directory, archive)

    def copy_out(self, sandbox: str, sandbox_id: str, path: str) -> Iterator[bytes]:
        return self._http("copy").download("copy", self._own("copy", sandbox, sandbox_id), path)

    def copy_workspace(self, source: str, source_id: str, sandbox: str, sandbox_id: str) -> None:
        try:
            source_container = self._own("clone", source, source_id)
        except ContainerMissing as exc:
            raise DriverError("clone", f"the source sandbox {source} has no container: {exc.message}") from exc
        http = self._http("clone")
        # The workspace's contents ("/."), unpacked into the new workspace itself: podman reaches a
        # volume of a container that never ran only through a path inside it, not through "/".
        contents = http.download("clone", source_container, f"{WORKSPACE}/.")
        http.upload("clone", self._own("clone", sandbox, sandbox_id), WORKSPACE, contents)

    def _http(self, operation: str) -> EngineHTTP:
        return EngineHTTP(operation, self.base_url, self._api_prefix(operation), self.timeout)


# -- exec over the engine's socket ---------------------------------------------------------


class EngineHTTP:
    """HTTP/1.1 on the engine's own socket, for what the SDKs cannot do: an exec's stream both
    ways, with standard input half-closed when it ends (``docker exec -i``). Podman serves the
    same exec endpoints as docker. Each request waits ``timeout`` seconds for the engine's answer;
    an upgraded stream then has no timeout, as a command may be silent for long."""

    def __init__(self, operation: str, base_url: str, prefix: str, timeout: float) -> None:
        url = urlsplit(base_url)
        self.address: Any
        if url.scheme in ("unix", "http+unix"):
            self.family, self.address = socket.AF_UNIX, url.path
        elif url.scheme in ("tcp", "http") and url.hostname:
            self.family, self.address = socket.AF_INET, (url.hostname, url.port or 2375)
        else:
            raise DriverError(operation, f"exec needs the engine on a unix socket or plain tcp, not {base_url}")
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout

    def _send(
        self, operation: str, method: str, path: str, body: Any, upgrade: bool
    ) -> tuple[socket.socket, int, dict[str, str], bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        headers = [
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            *(["Connection: Upgrade", "Upgrade: tcp"] if upgrade else ["Connection: close"]),
        ]
        sock = self._open(operation, method, path, headers, data)
        return (sock, *self._answer(operation, sock))

    def _open(self, operation: str, method: str, path: str, headers: list[str], data: bytes = b"") -> socket.socket:
        """A connection to the engine with the request's head (and ``data``) sent."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1", "Host: engine", *headers]
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        except TimeoutError as exc:
            sock.close()
            raise EngineTimeout(operation, f"the engine did not answer within {self.timeout:g}s") from exc
        except OSError as exc:
            sock.close()
            raise DriverError(operation, f"{type(exc).__name__}: {exc}") from exc
        return sock

    def _answer(self, operation: str, sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
        """The engine's answer's status and headers, and what came after them; closes on failure."""
        try:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(CHUNK)
                if not chunk:
                    raise DriverError(operation, "the engine closed the connection without an answer")
                buffer += chunk
                if len(buffer) > 1 << 20:
                    raise DriverError(operation, "the engine's answer has no end of headers")
        except TimeoutError as exc:
            sock.close()
            raise EngineTimeout(operation, f"the engine did not answer within {self.timeout:g}s") from exc
        except DriverError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise DriverError(operation, f"{type(exc).__name__}: {exc}") from exc
        header, _, rest = buffer.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            sock.close()
            raise DriverError(operation, f"the engine answered {lines[0]!r}") from None
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers, rest

    # -- archives: files into and out of a container, streamed -------------------------

    def path_stat(self, operation: str, container_id: str, path: str) -> dict[str, Any] | None:
        """What ``path`` is in the container (name, size, mode, linkTarget), or None if nothing is there."""
        sock = self._open(operation, "HEAD", _archive_path(container_id, path), ["Connection: close"])
        try:
            status, headers, _ = self._answer(operation, sock)
        finally:
            sock.close()
        if status == 404:
            return None
        if status >= 400:
            raise DriverError(operation, f"the engine answered {status} for {path}")
        raw = headers.get("x-docker-container-path-stat", "")
        try:
            stat: dict[str, Any] = json.loads(base64.b64decode(raw)) if raw else {}
        except ValueError:
            raise DriverError(operation, f"the engine's stat of {path} is not readable") from None
        return stat

    def upload(self, operation: str, container_id: str, path: str, chunks: Iterable[bytes]) -> None:
        """Put a tar archive, given as ``chunks``, into the directory ``path``: sent chunk by chunk
        as it is made (chunked transfer), never held whole."""
        headers = ["Content-Type: application/x-tar", "Transfer-Encoding: chunked", "Connection: close"]
        sock = self._open(operation, "PUT", _archive_path(container_id, path), headers)
        try:
            try:
                for chunk in chunks:
                    if chunk:
                        sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                sock.sendall(b"0\r\n\r\n")
            except OSError as exc:
                # The engine may have refused early (a path it will not write) and closed: its answer says why.
                with contextlib.suppress(DriverError):
                    status, headers_, rest = self._answer(operation, sock)
                    if status >= 400:
                        raise _status_error(operation, status, self._body(operation, sock, headers_, rest)) from exc
                raise DriverError(operation, f"{type(exc).__name__}: {exc}") from exc
            status, headers_, rest = self._answer(operation, sock)
            payload = self._body(operation, sock, headers_, rest)
        finally:
            sock.close()
        if status >= 400:
            raise _status_error(operation, status, payload)

    def download(self, operation: str, container_id: str, path: str) -> Iterator[bytes]:
        """A tar archive of ``path`` in the container, chunk by chunk as the engine sends it."""
        sock = self._open(operation, "GET", _archive_path(container_id, path), ["Connection: close"])
        try:
            status, headers, rest = self._answer(operation, sock)
            if status >= 400:
                raise _status_error(operation, status, self._body(operation, sock, headers, rest))
            yield from _stream_body(operation, sock, headers, rest, self.timeout)
        finally:
            sock.close()

    def _body(self, operation: str, sock: socket.socket, headers: dict[str, str], rest: bytes) -> bytes:
        try:
            if "content-length" in headers:
                size = int(headers["content-length"])
                while len(rest) < size:
                    chunk = sock.recv(CHUNK)
                    if not chunk:
                        break
                    rest += chunk
                return rest[:size]
            while True:  # Connection: close; chunked or not, the body ends with the connection
                chunk = sock.recv(CHUNK)
                if not chunk:
                    break
                rest += chunk
        except TimeoutError as exc:
            raise EngineTimeout(operation, f"the engine did not answer within {self.timeout:g}s") from exc
        except OSError as exc:
            raise DriverError(operation, f"{type(exc).__name__}: {exc}") from exc
        finally:
            sock.close()
        return _dechunk(rest) if "chunked" in headers.get("transfer-encoding", "") else rest

    def request(self, operation: str, method: str, path: str, body: Any = None) -> Any:
        """The engine's JSON answer; 404 is ContainerMissing, any other error status a DriverError."""
        sock, status, headers, rest = self._send(operation, method, path, body, upgrade=False)
        payload = self._body(operation, sock, headers, rest)
        if status >= 400:
            raise _status_error(operation, status, payload)
        return json.loads(payload) if payload.strip() else None

    def upgrade(self, operation: str, path: str, body: Any) -> tuple[socket.socket, bytes]:
        """The connection, taken over for the stream (101 Switching Protocols), and what came with
        the answer. An engine that does not switch could not be told when standard input ends."""
        sock, status, headers, rest = self._send(operation, "POST", path, body, upgrade=True)
        if status != 101:
            payload = self._body(operation, sock, headers, rest)
            if status >= 400:
                raise _status_error(operation, status, payload)
            raise DriverError(operation, f"the engine answered {status} instead of taking over the connection")
        sock.settimeout(None)
        return sock, rest


def _archive_path(container_id: str, path: str) -> str:
    return f"/containers/{container_id}/archive?path={quote(path, safe='/')}"


def _stream_body(
    operation: str, sock: socket.socket, headers: dict[str, str], rest: bytes, timeout: float
) -> Iterator[bytes]:
    """A response body as it arrives: chunked, of a stated length, or until the connection closes.
    A silence longer than ``timeout`` is EngineTimeout."""

    def received() -> Iterator[bytes]:
        if rest:
            yield rest
        while True:
            try:
                chunk = sock.recv(CHUNK)
            except TimeoutError as exc:
                raise EngineTimeout(operation, f"the engine sent nothing for {timeout:g}s") from exc
            except OSError as exc:
                raise DriverError(operation, f"{type(exc).__name__}: {exc}") from exc
            if not chunk:
                return
            yield chunk

    if "chunked" not in headers.get("transfer-encoding", ""):
        left = int(headers["content-length"]) if "content-length" in headers else -1
        for chunk in received():
            if left >= 0:
                chunk, left = chunk[:left], left - len(chunk[:left])
            if chunk:
                yield chunk
            if left == 0:
                return
        return
    buffer = b""
    source = received()
    while True:
        while b"\r\n" not in buffer:
            more = next(source, b"")
            if not more:
                raise DriverError(operation, "the engine's answer ended in the middle")
            buffer += more
        line, _, buffer = buffer.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            raise DriverError(operation, "the engine's answer is not readable") from None
        if size == 0:
            return
        while len(buffer) < size + 2:
            more = next(source, b"")
            if not more:
                raise DriverError(operation, "the engine's answer ended in the middle")
            buffer += more
        yield buffer[:size]
        buffer = buffer[size + 2 :]


def _dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return bytes(out)


def _status_error(operation: str, status: int, payload: bytes) -> DriverError:
    try:
        message = str(json.loads(payload).get("message") or "")
    except (ValueError, AttributeError):
        message = payload.decode(errors="replace").strip()
    message = message or f"the engine answered {status}"
    if status == 404 or any(gone in message.lower() for gone in GONE):
        return ContainerMissing(operation, message)
    return DriverError(operation, message)


def _frames(sock: socket.socket, early: bytes) -> Iterator[tuple[int, bytes]]:
    """The demultiplexed stream of a command without a tty: 8-byte headers (stream, 0, 0, 0,
    big-endian size) each followed by that many bytes."""
    buffer = bytearray(early)
    while True:
        while len(buffer) >= 8:
            size = int.from_bytes(buffer[4:8], "big")
            if len(buffer) < 8 + size:
                break
            kind = buffer[0]
            payload = bytes(buffer[8 : 8 + size])
            del buffer[: 8 + size]
            yield kind, payload
        try:
            chunk = sock.recv(CHUNK)
        except OSError:
            return
        if not chunk:
            return
        buffer += chunk


# The in-container way to end an exec's processes, for a client that cannot see or signal them
# from the host (another PID namespace, another user): every process whose environment carries
# the exec's variable gets SIGTERM, and SIGKILL if it is still there two seconds later.
_KILLER = r"""
mark="$1"; me=$$
carriers() {
  for p in /proc/[0-9]*; do
    n=${p#/proc/}
    [ "$n" = "$me" ] && continue
    tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qxF "$mark" && echo "$n"
  done
}
pids=$(carriers); [ -z "$pids" ] && exit 0
kill -TERM $pids 2>/dev/null
for i in 1 2; do sleep 1; pids=$(carriers); [ -z "$pids" ] && exit 0; done
kill -KILL $pids 2>/dev/null
exit 0
"""


class _ExecRun:
    """One exec's stream: its output handed on, its standard input pumped in, and its end."""

    def __init__(
        self, driver: EngineDriver, http: EngineHTTP, container_id: str, exec_id: str, token: str, sock: socket.socket
    ) -> None:
        self.driver = driver
        self.http = http
        self.container_id = container_id
        self.exec_id = exec_id
        self.mark = f"{EXEC_ID_ENV}={token}".encode()
        self.sock = sock
        self._lock = threading.Lock()
        self._ending = False
        self._ended = threading.Event()
        self._input_error: BaseException | None = None

    def wait(self, output: Callable[[int, bytes], None], stdin: IO[bytes] | None, early: bytes) -> int:
        if stdin is not None:
            threading.Thread(target=self._pump, args=(stdin,), daemon=True, name="sandboxctl-exec-stdin").start()
        try:
            for kind, chunk in _frames(self.sock, early):
                if chunk and kind in (1, 2, 3):
                    output(1 if kind == 1 else 2, chunk)
        except BaseException:
            self.end()  # our reader went away (a closed pipe): the command must not go on alone
            raise
        finally:
            if self._ending:
                self._ended.wait()
            with contextlib.suppress(OSError):
                self.sock.close()
        if self._input_error is not None:
            raise DriverError("exec", f"could not read standard input: {self._input_error}")
        return self._exit_code()

    def _exit_code(self) -> int:
        deadline = time.monotonic() + EXEC_SETTLE
        while True:
            state = self.http.request("exec", "GET", f"/exec/{self.exec_id}/json")
            if not state.get("Running") or time.monotonic() > deadline:
                return int(state.get("ExitCode") or 0)
            time.sleep(0.02)

    def _pump(self, stdin: IO[bytes]) -> None:
        read = getattr(stdin, "read1", None) or stdin.read
        try:
            while True:
                try:
                    chunk = read(CHUNK)
                except OSError as exc:
                    # Input we cannot read must not look like input that ended: the command is stopped.
                    self._input_error = exc
                    self.end()
                    return
                if not chunk:
                    break
                self.sock.sendall(chunk)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return  # the command ended (or was ended) before it read everything

    def end(self) -> None:
        """End the exec's processes, then its stream; idempotent, from any thread."""
        with self._lock:
            if self._ending:
                return
            self._ending = True
        try:
            if not self._end_from_host():
                self._end_in_container()
        except Exception:  # best effort: the stream is closed below whatever happened
            pass
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self._ended.set()

    def _carriers(self) -> tuple[list[int], bool]:
        """Host processes whose environment carries the exec's mark, and whether any could not be read."""
        found, unreadable = [], False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except PermissionError:
                unreadable = True
                continue
            except OSError:
                continue  # gone meanwhile
            if self.mark in environ.split(b"\0"):
                found.append(int(entry))
        return found, unreadable

    def _end_from_host(self) -> bool:
        """Signal the exec's processes from here (the CLI runs where the engine does); False if
        they could not be seen or signalled, which the container itself then does."""
        pids, unreadable = self._carriers()
        if not pids:
            return not unreadable and not self._running()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    return False
            deadline = time.monotonic() + (EXEC_KILL_GRACE if sig == signal.SIGTERM else EXEC_SETTLE)
            while time.monotonic() < deadline:
                pids, _ = self._carriers()
                if not pids:
                    return True
                time.sleep(0.05)
        return not self._carriers()[0]

    def _running(self) -> bool:
        try:
            return bool(self.http.request("exec", "GET", f"/exec/{self.exec_id}/json").get("Running"))
        except DriverError:
            return True

    def _end_in_container(self) -> None:
        made = self.http.request(
            "exec",
            "POST",
            f"/containers/{self.container_id}/exec",
            {
                "Cmd": ["sh", "-c", _KILLER, "sandboxctl-end", self.mark.decode()],
                "AttachStdout": True,
                "AttachStderr": True,
                "Tty": False,
            },
        )
        sock, early = self.http.upgrade("exec", f"/exec/{made['Id']}/start", {"Detach": False, "Tty": False})
        try:
            for _ in _frames(sock, early):
                pass
        finally:
            sock.close()
