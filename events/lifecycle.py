"""Lifecycle events: the facts of record in the log.

Each event is the payload of an Envelope whose ``subject`` is the sandbox name.
Work orders (the ``*Requested`` events and ``SandboxCreated``) carry the driver
and sandbox id so that a driver worker can act on one event alone, without
folding the sandbox's whole history first.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class _Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    TYPE: ClassVar[str] = ""
    TRIGGER: ClassVar[str] = ""


class SandboxCreated(_Event):
    sandbox_id: str
    image: str
    driver: str
    command: list[str] | None = None
    labels: dict[str, str] = {}
    TYPE: ClassVar[str] = "sandboxctl.sandbox.created.v1"
    TRIGGER: ClassVar[str] = "create"


class SandboxStopRequested(_Event):
    sandbox_id: str
    driver: str
    timeout: float = 10.0
    TYPE: ClassVar[str] = "sandboxctl.sandbox.stop_requested.v1"
    TRIGGER: ClassVar[str] = "request_stop"


class SandboxStopped(_Event):
    exit_code: int | None = None
    TYPE: ClassVar[str] = "sandboxctl.sandbox.stopped.v1"
    TRIGGER: ClassVar[str] = "stopped"


class SandboxStartRequested(_Event):
    sandbox_id: str
    driver: str
    TYPE: ClassVar[str] = "sandboxctl.sandbox.start_requested.v1"
    TRIGGER: ClassVar[str] = "request_start"


class SandboxReady(_Event):
    incarnation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.sandbox.ready.v1"
    TRIGGER: ClassVar[str] = "ready"


class SandboxFailed(_Event):
    """v2 adds ``kind``, so that operators can group failures without parsing ``reason``."""

    kind: str  # "exited" (crash, kill, OOM), "backend_missing", or "driver" (the engine refused or failed)
    reason: str
    exit_code: int | None = None
    oom: bool = False
    operation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.sandbox.failed.v2"
    TRIGGER: ClassVar[str] = "fail"


class SandboxFailedV1(_Event):
    """The failure as first written: read from old logs and upcast, never written now."""

    reason: str
    exit_code: int | None = None
    oom: bool = False
    operation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.sandbox.failed.v1"
    TRIGGER: ClassVar[str] = "fail"

    def upcast(self) -> SandboxFailed:
        if self.operation:
            kind = "driver"
        elif self.reason == "backend_missing":
            kind = "backend_missing"
        else:
            kind = "exited"
        return SandboxFailed(
            kind=kind, reason=self.reason, exit_code=self.exit_code, oom=self.oom, operation=self.operation
        )


class SandboxDeleteRequested(_Event):
    sandbox_id: str
    driver: str
    TYPE: ClassVar[str] = "sandboxctl.sandbox.delete_requested.v1"
    TRIGGER: ClassVar[str] = "request_delete"


class SandboxDeleted(_Event):
    TYPE: ClassVar[str] = "sandboxctl.sandbox.deleted.v1"
    TRIGGER: ClassVar[str] = "deleted"


LifecycleEvent = (
    SandboxCreated
    | SandboxStopRequested
    | SandboxStopped
    | SandboxStartRequested
    | SandboxReady
    | SandboxFailed
    | SandboxDeleteRequested
    | SandboxDeleted
)
WORK_ORDERS = (SandboxCreated, SandboxStopRequested, SandboxStartRequested, SandboxDeleteRequested)
EVENT_TYPES: dict[str, type[_Event]] = {
    cls.TYPE: cls
    for cls in (
        SandboxCreated,
        SandboxStopRequested,
        SandboxStopped,
        SandboxStartRequested,
        SandboxReady,
        SandboxFailed,
        SandboxFailedV1,
        SandboxDeleteRequested,
        SandboxDeleted,
    )
}
