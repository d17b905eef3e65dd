"""decide / react / evolve: the whole lifecycle policy as pure functions.

``decide`` answers a user's command, ``react`` answers a driver's fact; both
return the events to append (possibly none) and never mutate state. ``evolve``
is the only way state changes, and it checks every event against the static
machine, so a log that breaks the rules cannot be folded silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from sandboxctl.events import subjects
from sandboxctl.events.commands import (
    ArchiveSandbox,
    CloneSandbox,
    CreateSandbox,
    DeleteSandbox,
    PauseSandbox,
    ResumeSandbox,
    SandboxCommand,
    StartSandbox,
    StopSandbox,
    UpdateSandbox,
    WarnSandbox,
)
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.facts import (
    ContainerExited,
    ContainerPaused,
    ContainerRemoved,
    ContainerResumed,
    ContainerStarted,
    DriverFailed,
    Fact,
    WorkspaceArchived,
)
from sandboxctl.events.lifecycle import (
    LifecycleEvent,
    SandboxArchived,
    SandboxArchiveRequested,
    SandboxCompleted,
    SandboxCreated,
    SandboxDeleted,
    SandboxDeleteRequested,
    SandboxFailed,
    SandboxPaused,
    SandboxPauseRequested,
    SandboxReady,
    SandboxResumeRequested,
    SandboxStartRequested,
    SandboxStopped,
    SandboxStopRequested,
    SandboxUpdated,
    SandboxWarningCancelled,
)
from sandboxctl.events.limits import (
    COMMAND_BYTES_MAX,
    GRACE_MAX,
    IDLE_MAX,
    LABELS_MAX,
    RESERVED_LABEL_PREFIX,
    VM_MEMORY_MIN,
)
from sandboxctl.events.replies import ErrorCode
from sandboxctl.events.spec import Resources
from sandboxctl.statemachine.idle import (
    ARCHIVE,
    AUTO_ARCHIVE,
    AUTO_DELETE,
    DELETE,
    IDLE,
    STOP,
    ActivityCommand,
    bad_seconds,
    check_create,
    check_reaped,
    check_start,
    decide_activity,
    fold_activity,
)
from sandboxctl.statemachine.machine import TABLE, allowed_sources, destination
from sandboxctl.statemachine.names import validate_name
from sandboxctl.statemachine.phases import ABSENT, Phase
from sandboxctl.statemachine.rejection import Decision, Rejection
from sandboxctl.statemachine.state import SandboxState

# The reason recorded when a sandbox's container disappeared behind sandboxctl's back.
BACKEND_MISSING = "backend_missing"

__all__ = ["BACKEND_MISSING", "Decision", "Rejection", "decide", "evolve", "fold", "react"]

# A second stop shortens a pending grace only when it ends at least this much sooner (seconds):
# a retry of the same stop, decided a moment later, must stay a no-op.
SHORTER = 1.0

_NOOP: dict[type, frozenset[Phase]] = {
    # A Completed sandbox's process has already ended: there is nothing to stop.
    StopSandbox: frozenset({Phase.STOPPING, Phase.STOPPED, Phase.COMPLETED}),
    StartSandbox: frozenset({Phase.STARTING, Phase.READY}),
    DeleteSandbox: frozenset({Phase.DELETING, Phase.DELETED}),
    PauseSandbox: frozenset({Phase.PAUSING, Phase.PAUSED}),
    ResumeSandbox: frozenset({Phase.RESUMING, Phase.READY}),
    ArchiveSandbox: frozenset({Phase.ARCHIVING, Phase.ARCHIVED}),
}


def _not_allowed(state: SandboxState, verb: str, trigger: str, noop: Iterable[Phase]) -> Rejection:
    allowed = sorted({*allowed_sources(trigger), *noop}, key=lambda p: list(Phase).index(Phase(p)))
    listed = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
    return Rejection(
        ErrorCode.FAILED_PRECONDITION,
        f"sandbox {state.name} is {state.phase.value}; {verb} is allowed in {listed}",
    )


def _reserved(labels: Iterable[str]) -> Rejection | None:
    reserved = sorted(key for key in labels if key.startswith(RESERVED_LABEL_PREFIX))
    if reserved:
        return Rejection(
            ErrorCode.INVALID_ARGUMENT,
            f"label {reserved[0][:40]!r}: keys starting with {RESERVED_LABEL_PREFIX!r} are sandboxctl's own",
        )
    return None


# Drivers whose workspace cannot yet be read from outside the sandbox (a VM's is a disk inside the
# guest, and its files are reached only through the guest): archive is refused for their sandboxes.
NO_ARCHIVE = frozenset({"vm"})


def _vm_memory(driver: str, resources: Resources | None) -> Rejection | None:
    """A vm sandbox asked to boot in less memory than its guest kernel needs: refused before it is
    logged, as a container asked to run in less than any process needs is (events/limits.py)."""
    memory = resources.memory if resources is not None else None
    if driver != "vm" or memory is None or memory >= VM_MEMORY_MIN:
        return None
    return Rejection(
        ErrorCode.INVALID_ARGUMENT,
        f"memory {memory / 2**20:g} MiB is below the {VM_MEMORY_MIN >> 20} MiB a vm sandbox's guest needs to boot",
    )


# While these run nothing, a sandbox's resources may change: its container is made again with
# them at the next start (a running container keeps what it was made with).
RESIZABLE = frozenset({Phase.STOPPED, Phase.COMPLETED, Phase.ERROR})


def _update(state: SandboxState, command: UpdateSandbox) -> Decision:
    if state.phase is Phase.DELETING:
        return Rejection(ErrorCode.FAILED_PRECONDITION, f"sandbox {state.name} is Deleting; update is not allowed")
    changes: dict[str, object] = {}
    if command.resources:
        if state.phase not in RESIZABLE:
            return Rejection(
                ErrorCode.FAILED_PRECONDITION,
                f"sandbox {state.name} is {state.phase.value}; its resources change only while nothing runs "
                "(Stopped, Completed or Error): stop it first",
            )
        resources = state.resources.merged(command.resources)
        too_small = _vm_memory(state.driver, resources)
        if too_small is not None:
            return too_small
        if resources != state.resources:
            changes["resources"] = resources
    if command.labels or command.remove_labels:
        reserved = _reserved([*command.labels, *command.remove_labels])
        if reserved is not None:
            return reserved
        both = sorted(set(command.labels) & set(command.remove_labels))
        if both:
            return Rejection(ErrorCode.INVALID_ARGUMENT, f"label {both[0]!r} is both set and removed")
        labels = {k: v for k, v in {**state.labels, **command.labels}.items() if k not in command.remove_labels}
        if len(labels) > LABELS_MAX:
            return Rejection(ErrorCode.INVALID_ARGUMENT, f"{len(labels)} labels: at most {LABELS_MAX}")
        if labels != state.labels:
            changes["labels"] = labels
    if command.idle_timeout is not None:
        bad = bad_seconds("idle_timeout", command.idle_timeout, IDLE_MAX, positive=False)
        if bad is not None:
            return bad
        if command.idle_timeout != state.idle_timeout:
            changes["idle_timeout"] = command.idle_timeout
    if command.idle_action is not None and command.idle_action != state.idle_action:
        changes["idle_action"] = command.idle_action
    if not changes:
        return []  # nothing to change: nothing to record
    events: list[LifecycleEvent] = [SandboxUpdated(**changes)]  # type: ignore[arg-type]
    if state.warning is not None:
        # An update is its owner's use of it: a pending stop or delete does not happen.
        events.insert(0, SandboxWarningCancelled(kind=state.warning.kind, cause=command.VERB))
    return events


def _moved(name: str, seq: int, expected: int) -> Rejection:
    return Rejection(
        ErrorCode.CONFLICT,
        f"sandbox {name} is at log seq {seq}, not {expected}: it has changed since it was read; "
        "read it again and decide again",
        seq=seq,
    )


def decide(
    state: SandboxState | None, command: SandboxCommand, drivers: Iterable[str] = ("podman",), now: float = 0.0
) -> Decision:
    """``now`` (Unix time) is when the command is decided: leases expire and grace periods end by
    it. Left at 0, every lease is live and no grace period has ended, so nothing is reaped."""
    problem = validate_name(command.name)
    if problem:
        return Rejection(ErrorCode.INVALID_ARGUMENT, problem)
    exists = state is not None and state.phase is not Phase.DELETED
    if isinstance(command, CloneSandbox):
        # Decided with its source's state and spec (statemachine/clone.py), which this has not.
        return Rejection(ErrorCode.INTERNAL, "a clone is decided with its source: statemachine.clone.decide_clone")

    if isinstance(command, CreateSandbox):
        if exists and state is not None and state.sandbox_id == command.command_id:
            return []  # a retry of the create that made this sandbox
        if command.expected_seq is not None and command.expected_seq != (state.seq if state else 0):
            return _moved(command.name, state.seq if state else 0, command.expected_seq)
        if exists and state is not None:
            return Rejection(ErrorCode.ALREADY_EXISTS, f"sandbox {command.name} already exists ({state.phase.value})")
        if not command.image.strip():
            return Rejection(ErrorCode.INVALID_ARGUMENT, "image must not be empty")
        if command.command is not None and sum(len(arg) for arg in command.command) > COMMAND_BYTES_MAX:
            return Rejection(ErrorCode.INVALID_ARGUMENT, f"command must be at most {COMMAND_BYTES_MAX} bytes in all")
        reserved = _reserved(command.labels)
        if reserved is not None:
            return reserved
        nul = sorted(key for key, value in command.env.items() if "\x00" in value)
        if nul:
            return Rejection(ErrorCode.INVALID_ARGUMENT, f"env {nul[0]}: a value must not contain a NUL byte")
        idle_timeout = command.idle_timeout or 0.0
        invalid = check_create(idle_timeout, command.auto_delete_after, command.auto_archive_after)
        if invalid is not None:
            return invalid
        known = list(drivers)
        if command.driver not in known:
            return Rejection(
                ErrorCode.INVALID_ARGUMENT,
                f"unknown driver {command.driver!r}; configured drivers: {', '.join(known)}",
            )
        too_small = _vm_memory(command.driver, command.resources)
        if too_small is not None:
            return too_small
        if command.auto_archive_after and command.driver in NO_ARCHIVE:
            return Rejection(
                ErrorCode.INVALID_ARGUMENT, f"auto-archive is not available for {command.driver} sandboxes yet"
            )
        return [
            SandboxCreated(
                sandbox_id=command.command_id,
                image=command.image,
                driver=command.driver,
                host=command.host,
                command=command.command,
                labels=command.labels,
                idle_timeout=idle_timeout,
                auto_delete_after=command.auto_delete_after,
                resources=command.resources,
                env=command.env,
                idle_action=command.idle_action,
                auto_archive_after=command.auto_archive_after,
            )
        ]

    if state is None or (state.phase is Phase.DELETED and not isinstance(command, DeleteSandbox)):
        return Rejection(ErrorCode.NOT_FOUND, f"sandbox {command.name} not found")
    if command.expected_seq is not None and command.expected_seq != state.seq:
        return _moved(state.name, state.seq, command.expected_seq)
    if isinstance(command, ActivityCommand | WarnSandbox):
        return decide_activity(state, command, now)
    if isinstance(command, UpdateSandbox):
        return _update(state, command)
    if isinstance(command, StopSandbox):
        bad = bad_seconds("timeout", command.timeout, GRACE_MAX, positive=False)
        if bad is not None:
            return bad
        if state.phase is Phase.STOPPING and now + command.timeout < state.stop_by - SHORTER:
            # A stop while stopping whose grace ends sooner: the engine is asked again, and its
            # SIGKILL comes at the earlier time. A longer grace never extends the pending one.
            return [
                SandboxStopRequested(
                    sandbox_id=state.sandbox_id,
                    driver=state.driver,
                    host=state.host,
                    timeout=command.timeout,
                    reason=command.reason,
                )
            ]
    noop = _NOOP[type(command)]
    if state.phase in noop:
        return []
    if isinstance(command, StopSandbox):
        if state.phase not in (Phase.READY, Phase.PAUSED):
            return _not_allowed(state, "stop", "request_stop", noop)
        if command.reason == IDLE:
            refused = check_reaped(state, STOP, now)
            if refused is not None:
                return refused
        return [
            SandboxStopRequested(
                sandbox_id=state.sandbox_id,
                driver=state.driver,
                host=state.host,
                timeout=command.timeout,
                reason=command.reason,
            )
        ]
    if isinstance(command, StartSandbox):
        if (SandboxStartRequested.TRIGGER, state.phase.value) not in TABLE:
            return _not_allowed(state, "start", "request_start", noop)
        held = check_start(state)
        if held is not None:
            return held
        return [
            SandboxStartRequested(
                sandbox_id=state.sandbox_id,
                driver=state.driver,
                host=state.host,
                resources=state.resources,
                remake=state.resized,
                restore=state.archive,
            )
        ]
    if isinstance(command, PauseSandbox):
        if state.phase is not Phase.READY:
            return _not_allowed(state, "pause", "request_pause", noop)
        if command.reason == IDLE:
            refused = check_reaped(state, STOP, now)
            if refused is not None:
                return refused
        return [
            SandboxPauseRequested(
                sandbox_id=state.sandbox_id, driver=state.driver, host=state.host, reason=command.reason
            )
        ]
    if isinstance(command, ArchiveSandbox):
        if state.driver in NO_ARCHIVE:
            return Rejection(
                ErrorCode.FAILED_PRECONDITION, f"archive is not available for {state.driver} sandboxes yet (docs/vm.md)"
            )
        if state.phase is not Phase.STOPPED:
            return _not_allowed(state, "archive", "request_archive", noop)
        if command.reason == AUTO_ARCHIVE:
            refused = check_reaped(state, ARCHIVE, now)
            if refused is not None:
                return refused
        return [
            SandboxArchiveRequested(
                sandbox_id=state.sandbox_id,
                driver=state.driver,
                host=state.host,
                object=subjects.workspace_object(state.name, state.sandbox_id),
                reason=command.reason,
            )
        ]
    if isinstance(command, ResumeSandbox):
        if state.phase is not Phase.PAUSED:
            return _not_allowed(state, "resume", "request_resume", noop)
        return [SandboxResumeRequested(sandbox_id=state.sandbox_id, driver=state.driver, host=state.host)]
    assert isinstance(command, DeleteSandbox)
    if command.reason == AUTO_DELETE:
        refused = check_reaped(state, DELETE, now)
        if refused is not None:
            return refused
    return [
        SandboxDeleteRequested(
            sandbox_id=state.sandbox_id,
            driver=state.driver,
            host=state.host,
            reason=command.reason,
            archive=state.archive,
        )
    ]


def react(state: SandboxState | None, fact: Fact) -> list[LifecycleEvent]:
    """The phase events a driver fact causes; facts that change nothing give []."""
    if state is None or state.phase is Phase.DELETED:
        return []
    if fact.sandbox_id and fact.sandbox_id != state.sandbox_id:
        return []  # about a container of an earlier sandbox with the same name
    phase = state.phase
    if isinstance(fact, ContainerStarted):
        # A run that was stopped, or replaced by a later one, never comes back: a report of it
        # that arrives late (a watcher's copy, a reconciliation decided on an older snapshot)
        # must not move the sandbox. Runs are ordered by the engine's start time.
        answer = bool(fact.request_id) and fact.request_id == state.request_id
        if _has_ended(state, fact.incarnation) and not answer:
            return []
        if phase in (Phase.PROVISIONING, Phase.STARTING):
            return [SandboxReady(incarnation=fact.incarnation)]
        if phase is Phase.ERROR and not started_before(fact.incarnation, state.incarnation):
            return [SandboxReady(incarnation=fact.incarnation)]
        if phase in (Phase.READY, Phase.STOPPED, Phase.COMPLETED, Phase.PAUSED) and started_before(
            state.incarnation, fact.incarnation
        ):
            return [SandboxReady(incarnation=fact.incarnation)]
        return []
    if isinstance(fact, ContainerExited):
        if fact.incarnation and state.incarnation and fact.incarnation != state.incarnation:
            return []  # a late exit from an earlier run of the container
        if phase is Phase.STARTING and fact.incarnation and fact.incarnation == state.incarnation:
            return []  # the run being replaced; the new run has not reported yet
        if phase is Phase.STOPPING:
            return [SandboxStopped(exit_code=fact.exit_code)]
        if phase is Phase.ERROR and state.failed_operation == "stop":
            # The stop failed as far as sandboxctl could tell (the engine did not answer in time,
            # or went away mid-call), and the engine now shows the run ended: it was stopped.
            return [SandboxStopped(exit_code=fact.exit_code)]
        if phase in _RUNNING:
            if fact.exit_code == 0 and not fact.oom and not fact.requested and phase in _MAY_COMPLETE:
                return [SandboxCompleted(exit_code=0, incarnation=fact.incarnation)]  # a job done
            reason = f"container exited with code {fact.exit_code}" + (" (out of memory)" if fact.oom else "")
            return [SandboxFailed(kind="exited", reason=reason, exit_code=fact.exit_code, oom=fact.oom)]
        return []
    if isinstance(fact, ContainerPaused | ContainerResumed):
        if fact.incarnation and state.incarnation and fact.incarnation != state.incarnation:
            return []  # about an earlier run
        if isinstance(fact, ContainerPaused):
            return [SandboxPaused()] if phase in (Phase.PAUSING, Phase.READY) else []
        # Not while Pausing: the container runs until the pause takes, so a report that it runs
        # unpaused then is the echo of an earlier thaw (an engine's event stream lags), and must
        # not undo the pause under way. A thaw made outside after the pause is reported after it.
        if phase in (Phase.RESUMING, Phase.PAUSED):
            return [SandboxReady(incarnation=state.incarnation)]
        return []
    if isinstance(fact, WorkspaceArchived):
        # Late (the deadline failed the archive while it streamed) is still done: the volume is
        # gone and the object is the workspace, which the log must name.
        if phase is Phase.ARCHIVING or (phase is Phase.ERROR and state.failed_operation == "archive"):
            return [SandboxArchived(object=fact.object, digest=fact.digest, size=fact.size)]
        return []
    if isinstance(fact, ContainerRemoved):
        if phase in (Phase.ARCHIVING, Phase.ARCHIVED) and not fact.workspace_removed:
            return []  # the archive removes the container itself, once the workspace is stored
        if phase is Phase.STARTING and state.archive and not fact.workspace_removed:
            # A restore removes what an earlier, unfinished one left; a watcher that comes up after
            # a killed worker may report that removal again. A removal made outside fails the
            # restore itself, which the worker reports.
            return []
        if phase is Phase.DELETING:
            # Only the delete's own report ends it: the workspace must be gone before the name is free.
            return [SandboxDeleted()] if fact.workspace_removed else []
        if phase is Phase.ERROR and state.failed_operation == "delete" and not fact.workspace_removed:
            # The delete removed the container and then failed (the engine refused the workspace):
            # the container's removal, seen again by a watcher, is that same delete, not news; the
            # engine's reason for the failure stays the sandbox's error.
            return []
        return _fail(state, SandboxFailed(kind=BACKEND_MISSING, reason=BACKEND_MISSING))
    if isinstance(fact, DriverFailed):
        reason = f"{fact.operation} failed: {fact.message}"
        return _fail(state, SandboxFailed(kind="driver", reason=reason, operation=fact.operation))
    return []  # ContainerCreated and ContainerOrphaned change no phase


def _run_key(incarnation: str) -> tuple[float, int, str]:
    """An engine start time (RFC 3339, nanoseconds, as podman and docker write it) as a sortable key;
    anything else sorts as text, after no run at all."""
    text = incarnation.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    digits = ""
    if dot:
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
    try:
        whole = datetime.fromisoformat(head + rest)
    except ValueError:
        return (0.0, 0, incarnation)
    return (whole.timestamp(), int((digits or "0").ljust(9, "0")[:9]), "")


def started_before(earlier: str, later: str) -> bool:
    """Whether run ``earlier`` started before run ``later``; an unknown run is the oldest."""
    if not later:
        return False
    if not earlier:
        return True
    return _run_key(earlier) < _run_key(later)


def _has_ended(state: SandboxState, incarnation: str) -> bool:
    """Whether run ``incarnation`` is the run known to have ended, or older than it."""
    return bool(state.ended and incarnation) and not started_before(state.ended, incarnation)


def _fail(state: SandboxState, event: SandboxFailed) -> list[LifecycleEvent]:
    # The same failure seen again (a watcher's copy, a second reconciliation) is already recorded.
    if state.phase is Phase.ERROR and state.last_error == event.reason:
        return []
    return [event]


# Phases with a process that may end: its exit is news (a failure, or a job's completion).
_RUNNING = frozenset({Phase.PROVISIONING, Phase.STARTING, Phase.READY, Phase.PAUSING, Phase.PAUSED, Phase.RESUMING})
# An exit 0 is a job done only where the process ran on its own; a frozen one was ended from outside.
_MAY_COMPLETE = frozenset({Phase.PROVISIONING, Phase.STARTING, Phase.READY})

# Folding is the hot loop of every replay: isinstance gets a tuple, not a union built per call.
_REQUESTS = (
    SandboxStopRequested,
    SandboxStartRequested,
    SandboxPauseRequested,
    SandboxResumeRequested,
    SandboxArchiveRequested,
    SandboxDeleteRequested,
)


def evolve(state: SandboxState | None, envelope: Envelope, seq: int = 0) -> SandboxState:
    """Fold one logged event into state; raises IllegalTransition on a broken log."""
    event = envelope.data
    source = ABSENT if state is None else state.phase.value
    phase = destination(event.TRIGGER, source)
    moment = envelope.time.timestamp()
    if isinstance(event, SandboxCreated):
        return SandboxState(
            name=envelope.subject,
            sandbox_id=event.sandbox_id,
            phase=phase,
            driver=event.driver,
            host=event.host,
            seq=seq,
            since=moment,
            request_id=envelope.id,
            idle_timeout=event.idle_timeout,
            auto_delete_after=event.auto_delete_after,
            auto_archive_after=event.auto_archive_after,
            last_activity=moment,
            activity_seq=seq,
            labels=event.labels,
            resources=event.resources,
            idle_action=event.idle_action,
        )
    assert state is not None
    changes: dict[str, object] = {"phase": phase, "seq": seq or state.seq}
    if phase is not state.phase:
        changes["since"] = moment
        if state.failed_operation:
            changes["failed_operation"] = ""
    fold_activity(state, envelope, seq, phase, changes, moment)
    if isinstance(event, SandboxReady):
        changes["incarnation"] = event.incarnation
        changes["last_error"] = ""
        if state.resized and state.phase is Phase.STARTING:
            changes["resized"] = False  # the start order made the container again
        if state.archive:
            changes["archive"] = ""  # restored: the object is dropped once the container runs
    elif isinstance(event, SandboxArchived):
        changes["archive"] = event.object
    elif isinstance(event, SandboxFailed):
        changes["last_error"] = event.reason
        changes["failed_operation"] = event.operation
        if event.kind == "exited":
            changes["ended"] = state.incarnation or state.ended
    elif isinstance(event, SandboxStopped):
        changes["last_error"] = ""
        changes["ended"] = state.incarnation or state.ended
    elif isinstance(event, SandboxCompleted):
        # The run that completed is the sandbox's last run, and it has ended (it may complete
        # before the report of its start arrives: that report must not make it Ready).
        run = event.incarnation or state.incarnation
        changes["last_error"] = ""
        changes["incarnation"] = run
        changes["ended"] = run or state.ended
    elif isinstance(event, SandboxUpdated):
        if event.resources is not None:
            changes["resources"] = event.resources
            changes["resized"] = True
        if event.labels is not None:
            changes["labels"] = event.labels
        if event.idle_timeout is not None:
            changes["idle_timeout"] = event.idle_timeout
        if event.idle_action is not None:
            changes["idle_action"] = event.idle_action
    elif isinstance(event, _REQUESTS):
        changes["request_id"] = envelope.id
        if isinstance(event, SandboxStopRequested):
            # When the engine's SIGKILL comes: the earliest grace asked for since Ready.
            stop_by = moment + event.timeout
            changes["stop_by"] = min(stop_by, state.stop_by) if state.phase is Phase.STOPPING else stop_by
    return msgspec.structs.replace(state, **changes)


def skip(state: SandboxState | None, seq: int) -> SandboxState | None:
    """The state after a log entry at ``seq`` that cannot be folded: unchanged but for its position,
    which is the log's (see bus.eventlog.fold_logged). A sandbox with no state has none to move."""
    if state is None or state.seq >= seq:
        return state
    return msgspec.structs.replace(state, seq=seq)


def fold(envelopes: Iterable[tuple[Envelope, int]]) -> SandboxState | None:
    state: SandboxState | None = None
    for envelope, seq in envelopes:
        state = evolve(state, envelope, seq)
    return state
