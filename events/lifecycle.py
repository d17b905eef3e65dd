"""Lifecycle events: the facts of record in the log.

Each event is the payload of an Envelope whose ``subject`` is the sandbox name.
Work orders (the ``*Requested`` events and ``SandboxCreated``) carry the driver
and sandbox id so that a driver worker can act on one event alone, without
folding the sandbox's whole history first.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from sandboxctl.events.spec import NO_RESOURCES, Resources


class _Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    TYPE: ClassVar[str] = ""
    TRIGGER: ClassVar[str] = ""
    # Whether the event is use of the sandbox, which restarts its idle clock: everything but
    # the reaper's own warnings and their cancellation (see statemachine/idle.py).
    ACTIVITY: ClassVar[bool] = True


class SandboxCreated(_Event):
    sandbox_id: str
    image: str
    driver: str
    host: str = ""  # the host it is placed on (its driver worker's); "": placed before hosts
    command: list[str] | None = None
    labels: dict[str, str] = {}
    idle_timeout: float = 0.0  # seconds; 0: never auto-stopped
    auto_delete_after: float = 0.0  # seconds Stopped before an auto-delete; 0 (the default): never
    resources: Resources = NO_RESOURCES  # limits the engine enforces; absent ones: the engine's default
    env: dict[str, str] = {}  # the environment of the sandbox's processes (in clear in the log)
    idle_action: str = "stop"  # what the reaper does once it is idle: "stop" or "pause"
    auto_archive_after: float = 0.0  # seconds Stopped before an auto-archive; 0 (the default): never
    # A clone's: the sandbox whose workspace it starts with (name and id), and whether that one was
    # running, so is paused for the copy and resumed.
    clone_from: str = ""
    clone_from_id: str = ""
    clone_paused: bool = False
    TYPE: ClassVar[str] = "sandboxctl.sandbox.created.v1"
    TRIGGER: ClassVar[str] = "create"


class SandboxStopRequested(_Event):
    sandbox_id: str
    driver: str
    host: str = ""  # the host it is placed on (its driver worker's); "": placed before hosts
    timeout: float = 10.0
    reason: str = ""  # "idle" when the reaper stopped it
    TYPE: ClassVar[str] = "sandboxctl.sandbox.stop_requested.v1"
    TRIGGER: ClassVar[str] = "request_stop"


class SandboxStopped(_Event):
    exit_code: int | None = None
    TYPE: ClassVar[str] = "sandboxctl.sandbox.stopped.v1"
    TRIGGER: ClassVar[str] = "stopped"


class SandboxStartRequested(_Event):
    sandbox_id: str
    driver: str
    host: str = ""  # the host it is placed on (its driver worker's); "": placed before hosts
    # The limits the sandbox has now: with ``remake`` (they changed since its container was made),
    # a container made with others is made again with these before it starts.
    resources: Resources = NO_RESOURCES
    remake: bool = False
    # The archived workspace to restore first (the sandbox is Archived, or a restore did not finish).
    restore: str = ""
    TYPE: ClassVar[str] = "sandboxctl.sandbox.start_requested.v1"
    TRIGGER: ClassVar[str] = "request_start"


class SandboxReady(_Event):
    incarnation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.sandbox.ready.v1"
    TRIGGER: ClassVar[str] = "ready"


class SandboxPauseRequested(_Event):
    sandbox_id: str
    driver: str
    host: str = ""  # the host it is placed on (its driver worker's); "": placed before hosts
    reason: str = ""  # "idle" when the reaper paused it
    TYPE: ClassVar[str] = "sandboxctl.sandbox.pause_requested.v1"
    TRIGGER: ClassVar[str] = "request_pause"


class SandboxPaused(_Event):
    """The engine froze the sandbox's processes (by sandboxctl's pause, or one made outside)."""

    TYPE: ClassVar[str] = "sandboxctl.sandbox.paused.v1"
    TRIGGER: ClassVar[str] = "paused"


class SandboxResumeRequested(_Event):
    sandbox_id: str
    driver: str
    host: str = ""  # the host it is placed on (its driver worker's); "": placed before hosts
    TYPE: ClassVar[str] = "sandboxctl.sandbox.resume_requested.v1"
    TRIGGER: ClassVar[str] = "request_resume"


class SandboxArchiveRequested(_Event):
    sandbox_id: str
    driver: str
    object: str  # the name of the workspace's object in the workspaces bucket
    host: str = ""  # the host it is placed on (its driver worker's); "": placed before hosts
    reason: str = ""
    TYPE: ClassVar[str] = "sandboxctl.sandbox.archive_requested.v1"
    TRIGGER: ClassVar[str] = "request_archive"


class SandboxArchived(_Event):
    """The workspace is in the object store, whole and checked; container and volume are gone."""

    object: str
    digest: str  # SHA-256 of the archive, as the object store states it
    size: int = 0
    TYPE: ClassVar[str] = "sandboxctl.sandbox.archived.v1"
    TRIGGER: ClassVar[str] = "archived"


class SandboxCompleted(_Event):
    """The sandbox's main process exited 0 on its own: a job that ran to its end. Not a failure,
    and not a stop; ``start`` runs it again."""

    exit_code: int = 0
    incarnation: str = ""  # the run that completed: a late report of its start must not make it Ready
    TYPE: ClassVar[str] = "sandboxctl.sandbox.completed.v1"
    TRIGGER: ClassVar[str] = "complete"


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
    host: str = ""  # the host it is placed on (its driver worker's); "": placed before hosts
    reason: str = ""  # "auto_delete" when the reaper deleted it (opt-in)
    archive: str = ""  # the object its workspace is archived as, deleted with it
    TYPE: ClassVar[str] = "sandboxctl.sandbox.delete_requested.v1"
    TRIGGER: ClassVar[str] = "request_delete"


class SandboxDeleted(_Event):
    TYPE: ClassVar[str] = "sandboxctl.sandbox.deleted.v1"
    TRIGGER: ClassVar[str] = "deleted"


class SandboxUpdated(_Event):
    """The sandbox was changed: each field present is its new value, whole (``resources`` and
    ``labels`` as they are after the change). Keeps the phase; new resources reach the engine at
    the next start (SandboxStartRequested carries them)."""

    resources: Resources | None = None
    labels: dict[str, str] | None = None
    idle_timeout: float | None = None
    idle_action: str | None = None
    TYPE: ClassVar[str] = "sandboxctl.sandbox.updated.v1"
    TRIGGER: ClassVar[str] = "note"


# Use, leases, holds and the reaper's warnings. None of them changes the phase (trigger
# ``note``, a self-transition of every live phase); none is a work order, so no driver acts
# on them (their types must never end in ``_requested``: see services/worker.py).


class SandboxTouched(_Event):
    via: str = "touch"
    TYPE: ClassVar[str] = "sandboxctl.sandbox.touched.v1"
    TRIGGER: ClassVar[str] = "note"


class SandboxCopied(_Event):
    """Files were copied into (``in``) or out of (``out``) the sandbox at ``path`` by ``sandboxctl
    cp``: an archive of ``size`` bytes."""

    direction: str
    path: str
    size: int = 0
    TYPE: ClassVar[str] = "sandboxctl.sandbox.copied.v1"
    TRIGGER: ClassVar[str] = "note"


class SandboxLeaseAcquired(_Event):
    holder: str
    ttl: float  # seconds from the event's time
    TYPE: ClassVar[str] = "sandboxctl.sandbox.lease_acquired.v1"
    TRIGGER: ClassVar[str] = "note"


class SandboxLeaseRenewed(_Event):
    holder: str
    ttl: float
    TYPE: ClassVar[str] = "sandboxctl.sandbox.lease_renewed.v1"
    TRIGGER: ClassVar[str] = "note"


class SandboxLeaseReleased(_Event):
    holder: str
    TYPE: ClassVar[str] = "sandboxctl.sandbox.lease_released.v1"
    TRIGGER: ClassVar[str] = "note"


class SandboxStopHoldPlaced(_Event):
    holder: str
    reason: str = ""
    TYPE: ClassVar[str] = "sandboxctl.sandbox.stop_hold_placed.v1"
    TRIGGER: ClassVar[str] = "note"


class SandboxStopHoldReleased(_Event):
    holder: str
    TYPE: ClassVar[str] = "sandboxctl.sandbox.stop_hold_released.v1"
    TRIGGER: ClassVar[str] = "note"


class SandboxStopWarning(_Event):
    """Stopping soon: the sandbox was idle past its timeout; the reaper stops it after ``grace``
    seconds unless a touch or a lease comes first."""

    grace: float
    activity_seq: int  # the deadline's identity: the log sequence of the activity it counts from
    idle_timeout: float = 0.0
    TYPE: ClassVar[str] = "sandboxctl.sandbox.stop_warning.v1"
    TRIGGER: ClassVar[str] = "note"
    ACTIVITY: ClassVar[bool] = False


class SandboxDeleteWarning(_Event):
    """Deleting soon (opt-in auto-delete): Stopped past ``auto_delete_after``; the workspace is
    destroyed after ``grace`` seconds unless a touch or a lease comes first."""

    grace: float
    activity_seq: int
    auto_delete_after: float = 0.0
    TYPE: ClassVar[str] = "sandboxctl.sandbox.delete_warning.v1"
    TRIGGER: ClassVar[str] = "note"
    ACTIVITY: ClassVar[bool] = False


class SandboxArchiveWarning(_Event):
    """Archiving soon (opt-in auto-archive): Stopped past ``auto_archive_after``; the workspace
    moves into the object store after ``grace`` seconds unless a touch or a lease comes first."""

    grace: float
    activity_seq: int
    auto_archive_after: float = 0.0
    TYPE: ClassVar[str] = "sandboxctl.sandbox.archive_warning.v1"
    TRIGGER: ClassVar[str] = "note"
    ACTIVITY: ClassVar[bool] = False


class SandboxWarningCancelled(_Event):
    """A pending stop or delete warning no longer holds: someone used the sandbox in its grace."""

    kind: str  # "stop", "archive" or "delete"
    cause: str  # the command that cancelled it: touch, lease_acquire, ...
    TYPE: ClassVar[str] = "sandboxctl.sandbox.warning_cancelled.v1"
    TRIGGER: ClassVar[str] = "note"
    ACTIVITY: ClassVar[bool] = False


LifecycleEvent = (
    SandboxCreated
    | SandboxStopRequested
    | SandboxStopped
    | SandboxStartRequested
    | SandboxReady
    | SandboxPauseRequested
    | SandboxPaused
    | SandboxResumeRequested
    | SandboxArchiveRequested
    | SandboxArchived
    | SandboxCompleted
    | SandboxFailed
    | SandboxDeleteRequested
    | SandboxDeleted
    | SandboxUpdated
    | SandboxTouched
    | SandboxCopied
    | SandboxLeaseAcquired
    | SandboxLeaseRenewed
    | SandboxLeaseReleased
    | SandboxStopHoldPlaced
    | SandboxStopHoldReleased
    | SandboxStopWarning
    | SandboxDeleteWarning
    | SandboxArchiveWarning
    | SandboxWarningCancelled
)
WORK_ORDERS = (
    SandboxCreated,
    SandboxStopRequested,
    SandboxStartRequested,
    SandboxPauseRequested,
    SandboxResumeRequested,
    SandboxArchiveRequested,
    SandboxDeleteRequested,
)
EVENT_TYPES: dict[str, type[_Event]] = {
    cls.TYPE: cls
    for cls in (
        SandboxCreated,
        SandboxStopRequested,
        SandboxStopped,
        SandboxStartRequested,
        SandboxReady,
        SandboxPauseRequested,
        SandboxPaused,
        SandboxResumeRequested,
        SandboxArchiveRequested,
        SandboxArchived,
        SandboxCompleted,
        SandboxFailed,
        SandboxFailedV1,
        SandboxDeleteRequested,
        SandboxDeleted,
        SandboxUpdated,
        SandboxTouched,
        SandboxCopied,
        SandboxLeaseAcquired,
        SandboxLeaseRenewed,
        SandboxLeaseReleased,
        SandboxStopHoldPlaced,
        SandboxStopHoldReleased,
        SandboxStopWarning,
        SandboxDeleteWarning,
        SandboxArchiveWarning,
        SandboxWarningCancelled,
    )
}
