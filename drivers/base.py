"""The driver contract every engine implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgspec

MANAGED = "sandboxctl.managed"
SANDBOX = "sandboxctl.sandbox"
SANDBOX_ID = "sandboxctl.sandbox_id"


def container_name(sandbox: str) -> str:
    return f"sandboxctl-{sandbox}"


def volume_name(sandbox: str) -> str:
    return f"sandboxctl-{sandbox}-workspace"


def labels_for(sandbox: str, sandbox_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**(extra or {}), MANAGED: "true", SANDBOX: sandbox, SANDBOX_ID: sandbox_id}


def owned_by(labels: dict[str, str] | None, sandbox_id: str) -> bool:
    """Whether a container or volume found by name may be acted on for sandbox ``sandbox_id``.

    Names are reused: once a sandbox is deleted its name may be created again at once, so a
    late or repeated delete of the old sandbox must leave the new one's container and
    workspace alone. An empty ``sandbox_id`` (a caller that does not know) or an unlabelled
    object matches."""
    owner = (labels or {}).get(SANDBOX_ID, "")
    return not sandbox_id or not owner or owner == sandbox_id


def foreign_workspace(volume: str, labels: dict[str, str] | None, sandbox_id: str) -> DriverError | None:
    """The error for a create that finds the name's workspace volume owned by another sandbox:
    its files are that sandbox's, never to be handed to a new one."""
    if owned_by(labels, sandbox_id):
        return None
    owner = (labels or {}).get(SANDBOX_ID, "")
    return DriverError("create", f"workspace volume {volume} already exists and belongs to sandbox id {owner}")


class SandboxSpec(msgspec.Struct, kw_only=True):
    name: str
    sandbox_id: str
    image: str
    command: list[str] | None = None
    labels: dict[str, str] = {}


class ContainerInfo(msgspec.Struct, kw_only=True):
    sandbox: str
    sandbox_id: str
    container_id: str
    running: bool
    status: str
    exit_code: int = 0
    oom: bool = False
    incarnation: str = ""  # the engine's start time of the current or last run


def container_info(attrs: dict[str, Any]) -> ContainerInfo:
    """A container as both engines' inspect output describes it (podman's follows docker's)."""
    state = attrs.get("State", {})
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    started = state.get("StartedAt", "")
    return ContainerInfo(
        sandbox=labels.get(SANDBOX, ""),
        sandbox_id=labels.get(SANDBOX_ID, ""),
        container_id=attrs.get("Id", ""),
        running=bool(state.get("Running")),
        status=str(state.get("Status", "")),
        exit_code=int(state.get("ExitCode") or 0),
        oom=bool(state.get("OOMKilled")),
        incarnation="" if started.startswith("0001-") else str(started),
    )


def exec_command(engine: list[str], sandbox: str, command: list[str], tty: bool) -> list[str]:
    """The engine CLI's command line (``engine``: the program and its connection flags) that
    runs ``command`` in the sandbox's container attached to this terminal."""
    return [*engine, "exec", "-i", *(["-t"] if tty else []), container_name(sandbox), *command]


class EngineEvent(msgspec.Struct, kw_only=True):
    """A change the engine reports for a managed container."""

    action: str  # "start", "die", "remove"
    sandbox: str
    container_id: str
    sandbox_id: str = ""
    exit_code: int | None = None


class DriverError(Exception):
    """The engine could not do what was asked; ``str()`` is the engine's message."""

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.message = message


class ContainerMissing(DriverError):
    pass


class Driver(Protocol):
    name: str
    # How many operations the engine takes at once before it serialises them and
    # callers start timing out: the driver worker never runs more at a time.
    parallelism: int

    def ping(self) -> None: ...
    def create(self, spec: SandboxSpec) -> ContainerInfo: ...
    def start(self, sandbox: str) -> ContainerInfo: ...
    def stop(self, sandbox: str, timeout: float) -> ContainerInfo: ...
    def delete(self, sandbox: str, sandbox_id: str = "") -> str:
        """Remove the container and its workspace volume if they belong to ``sandbox_id``; returns the
        removed container's id ("" if there was none). Removing what is gone succeeds."""
        ...

    def inspect(self, sandbox: str) -> ContainerInfo | None: ...
    def list_managed(self) -> list[ContainerInfo]: ...
    def events(self, since: float | None = None) -> Iterator[EngineEvent]:
        """Follow the engine's changes to managed containers, replaying those since ``since`` (a Unix time)."""
        ...

    def exec(self, sandbox: str, command: list[str], output: Callable[[int, bytes], None]) -> int:
        """Run ``command`` in the running container (in its working directory, without a tty),
        handing its output to ``output(fd, chunk)`` (1 stdout, 2 stderr) as it comes; returns
        its exit code. Blocks until the command ends."""
        ...

    def logs(
        self, sandbox: str, tail: int | None = None, since: float | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        """The container's output (stdout and stderr, as the engine stored it): the last ``tail``
        lines, from ``since`` (a Unix time); with ``follow``, until the container stops."""
        ...

    def interactive(self, sandbox: str, command: list[str], tty: bool) -> list[str]:
        """The engine's own command line that runs ``command`` in the container attached to the
        caller's terminal: terminal modes and resizes are the engine client's business."""
        ...

    def close(self) -> None: ...


EXEC_SETTLE = 2.0  # seconds to wait for an engine to record an exec's exit code once its output ends
