"""What the decider knows about one sandbox, rebuilt by folding its events."""

from __future__ import annotations

import msgspec

from sandboxctl.events.spec import NO_RESOURCES, Resources
from sandboxctl.statemachine.phases import Phase


class Lease(msgspec.Struct, frozen=True, gc=False):
    """A keep-alive: while ``expires`` (Unix time) is ahead, the reaper leaves the sandbox alone."""

    holder: str
    expires: float


class Hold(msgspec.Struct, frozen=True, gc=False):
    """A stop hold: the sandbox may not be started until the holder releases it."""

    holder: str
    reason: str = ""


class PendingWarning(msgspec.Struct, frozen=True, gc=False):
    """A pending reaper warning: ``kind`` (stop or delete) happens at ``deadline`` unless the
    sandbox is used first. It belongs to the activity at log seq ``activity_seq``."""

    kind: str
    activity_seq: int
    deadline: float
    grace: float


class SandboxState(msgspec.Struct, kw_only=True, gc=False):
    name: str
    sandbox_id: str
    phase: Phase
    driver: str
    host: str = ""  # the host it is placed on, whose driver worker alone works its orders
    seq: int = 0  # stream sequence of the last event on this sandbox's subject
    incarnation: str = ""  # the run (engine start time) the sandbox last became Ready on
    # The latest run known to have ended (stopped or exited): a report of it, or of an older run,
    # arriving late must never bring the sandbox back to Ready on a container that is gone.
    ended: str = ""
    request_id: str = ""  # the id of the event that asked the driver for the current phase's work
    last_error: str = ""
    # While in Error: the engine operation whose failure put it there ("stop", "start", ...; "" for a
    # crash). An exit observed after a failed stop is the stop done late: the sandbox is Stopped.
    failed_operation: str = ""
    since: float = 0.0  # when the current phase was entered (Unix time of its event): deadlines count from it
    stop_by: float = 0.0  # while Stopping: when the grace period asked for ends and the engine kills (Unix time)
    # Idleness (statemachine/idle.py). Tuples, not dicts: empty ones cost nothing per sandbox.
    idle_timeout: float = 0.0  # seconds; 0: never auto-stopped
    auto_delete_after: float = 0.0  # seconds Stopped before the opt-in auto-delete; 0: never
    auto_archive_after: float = 0.0  # seconds Stopped before the opt-in auto-archive; 0: never
    last_activity: float = 0.0  # Unix time of the last event that was use of the sandbox
    activity_seq: int = 0  # its log sequence: the identity of the idle deadline counted from it
    leases: tuple[Lease, ...] = ()
    holds: tuple[Hold, ...] = ()
    warning: PendingWarning | None = None
    # What the sandbox is made of that a command may change (UpdateSandbox).
    labels: dict[str, str] = {}
    resources: Resources = NO_RESOURCES
    # Its resources changed since its container was made: the next start order says to make it
    # again (until a start of sandboxctl's own has made it Ready; one made outside does not count).
    resized: bool = False
    idle_action: str = "stop"  # what the reaper does once it is idle: "stop", or "pause"
    # The object its workspace is archived as, until a start has restored it and it is Ready again.
    archive: str = ""
