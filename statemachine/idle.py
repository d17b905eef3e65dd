"""Idleness as pure functions: activity, leases, stop holds and the reaper's durable timers.

An idle reaper that deletes is how workspaces get lost, so this one only stops (the
opt-in auto-archive and auto-delete aside), and only in two logged steps: a warning with a grace
period, then the stop. Everything it needs is in the log: each event that is use of
the sandbox restarts its idle clock (``last_activity``, ``activity_seq``), leases
and holds are events, and so are the warnings. A deadline is therefore a function
of the folded state alone (``due``), which any reaper, restarted or not, computes
the same way; the ids of the commands it sends derive from the deadline, so a
deadline fires once however many reapers see it. The decider checks each of the
reaper's commands against the state it is appended to, so a touch or a lease that
wins the race cancels the stop even if the reaper has not seen it yet.
"""

from __future__ import annotations

import math

from sandboxctl.events.commands import (
    AcquireLease,
    ArchiveSandbox,
    DeleteSandbox,
    PauseSandbox,
    PlaceStopHold,
    RecordCopy,
    ReleaseLease,
    ReleaseStopHold,
    RenewLease,
    StopSandbox,
    TouchSandbox,
    WarnSandbox,
)
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.lifecycle import (
    LifecycleEvent,
    SandboxArchiveWarning,
    SandboxCopied,
    SandboxDeleteWarning,
    SandboxLeaseAcquired,
    SandboxLeaseReleased,
    SandboxLeaseRenewed,
    SandboxStopHoldPlaced,
    SandboxStopHoldReleased,
    SandboxStopWarning,
    SandboxTouched,
    SandboxWarningCancelled,
)
from sandboxctl.events.limits import HOLDER_MAX, IDLE_MAX, TTL_MAX
from sandboxctl.events.replies import ErrorCode
from sandboxctl.statemachine.phases import Phase
from sandboxctl.statemachine.rejection import Decision, Rejection
from sandboxctl.statemachine.state import Hold, Lease, PendingWarning, SandboxState

REAPER = "sandboxctl/reaper"  # the reaper's actor when authorization is off
IDLE = "idle"  # the reason of the reaper's stops
AUTO_DELETE = "auto_delete"  # the reason of its opt-in deletes
AUTO_ARCHIVE = "auto_archive"  # the reason of its opt-in archives
STOP, ARCHIVE, DELETE = "stop", "archive", "delete"  # warning kinds
PAUSE = "pause"  # an idle action beside STOP: the idle deadline pauses instead of stopping

ActivityCommand = TouchSandbox | AcquireLease | RenewLease | ReleaseLease | PlaceStopHold | ReleaseStopHold | RecordCopy


def live_leases(state: SandboxState, now: float) -> list[Lease]:
    return [lease for lease in state.leases if lease.expires > now]


def deadline(state: SandboxState) -> tuple[str, float] | None:
    """What the reaper will do to the sandbox, and from when: stop a Ready sandbox idle for
    ``idle_timeout``; opted in, archive one Stopped for ``auto_archive_after`` and delete one
    Stopped or Archived for ``auto_delete_after`` (the delete first when it is due no later
    than the archive), each counted from the last event that used it, the archive included.
    A lease, live or lapsed, pushes the deadline to its expiry: its holder was using the
    sandbox until then."""
    phase = state.phase
    if phase is Phase.READY and state.idle_timeout > 0:
        kind, limit = STOP, state.idle_timeout
    elif (
        phase is Phase.STOPPED
        and state.auto_archive_after > 0
        and not 0 < state.auto_delete_after <= state.auto_archive_after
    ):
        kind, limit = ARCHIVE, state.auto_archive_after
    elif phase in (Phase.STOPPED, Phase.ARCHIVED) and state.auto_delete_after > 0:
        kind, limit = DELETE, state.auto_delete_after
    else:
        return None
    at = state.last_activity + limit
    for lease in state.leases:
        at = max(at, lease.expires)
    return kind, at


ReaperCommand = WarnSandbox | StopSandbox | PauseSandbox | ArchiveSandbox | DeleteSandbox


def due(state: SandboxState, now: float, grace: float, actor: str = REAPER) -> ReaperCommand | None:
    """The reaper's timer: the command a deadline calls for at ``now``, or None.

    First a warning; once the warning's own grace has run out, the stop (or delete). Ids are
    derived from the sandbox and the activity the deadline counts from, so sending one twice
    (two reapers, a restart) stores it once."""
    found = deadline(state)
    if found is None:
        return None
    kind, at = found
    if now < at or live_leases(state, now):
        return None
    sid, seq = state.sandbox_id, state.activity_seq
    warning = state.warning
    if warning is None or warning.kind != kind or warning.activity_seq != seq:
        return WarnSandbox(
            name=state.name,
            command_id=f"warn-{kind}:{sid}:{seq}",
            actor=actor,
            kind=kind,
            activity_seq=seq,
            grace=grace,
        )
    if now < warning.deadline:
        return None
    if kind == STOP and state.idle_action == PAUSE:
        return PauseSandbox(name=state.name, command_id=f"idle-pause:{sid}:{seq}", actor=actor, reason=IDLE)
    if kind == STOP:
        return StopSandbox(name=state.name, command_id=f"idle:{sid}:{seq}", actor=actor, reason=IDLE)
    if kind == ARCHIVE:
        return ArchiveSandbox(name=state.name, command_id=f"auto-archive:{sid}:{seq}", actor=actor, reason=AUTO_ARCHIVE)
    return DeleteSandbox(name=state.name, command_id=f"auto-delete:{sid}:{seq}", actor=actor, reason=AUTO_DELETE)


def _reject(message: str, code: ErrorCode = ErrorCode.FAILED_PRECONDITION) -> Rejection:
    return Rejection(code, message)


def _bad_holder(holder: str) -> Rejection | None:
    if not holder.strip():
        return _reject("holder must not be empty", ErrorCode.INVALID_ARGUMENT)
    if len(holder) > HOLDER_MAX:
        return _reject(f"holder must be at most {HOLDER_MAX} characters", ErrorCode.INVALID_ARGUMENT)
    return None


def bad_seconds(what: str, value: float, maximum: float, positive: bool = True) -> Rejection | None:
    """Why ``value`` is not a number of seconds in range (None if it is): finite, not negative
    (not zero either when ``positive``), and at most ``maximum`` (events/limits.py)."""
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or value > maximum:
        need = "a positive" if positive else "a non-negative"
        return _reject(f"{what} must be {need} number of seconds, at most {maximum:g}", ErrorCode.INVALID_ARGUMENT)
    return None


def check_create(idle_timeout: float, auto_delete_after: float, auto_archive_after: float = 0.0) -> Rejection | None:
    return (
        bad_seconds("idle_timeout", idle_timeout, IDLE_MAX, positive=False)
        or bad_seconds("auto_delete_after", auto_delete_after, IDLE_MAX, positive=False)
        or bad_seconds("auto_archive_after", auto_archive_after, IDLE_MAX, positive=False)
    )


def _holders(leases: list[Lease]) -> str:
    return ", ".join(sorted(lease.holder for lease in leases))


def decide_activity(state: SandboxState, command: ActivityCommand | WarnSandbox, now: float) -> Decision:
    """Touch, leases, holds and the reaper's warning, for a sandbox that exists."""
    if state.phase is Phase.DELETING:
        return _reject(f"sandbox {state.name} is Deleting; {command.VERB} is allowed in any other phase")
    if isinstance(command, WarnSandbox):
        return _warn(state, command, now)
    events: list[LifecycleEvent]
    if isinstance(command, TouchSandbox):
        events = [SandboxTouched(via=command.via or "touch")]
    elif isinstance(command, RecordCopy):
        events = [SandboxCopied(direction=command.direction, path=command.path, size=command.size)]
    else:
        problem = _bad_holder(command.holder)
        if problem is not None:
            return problem
        held = any(lease.holder == command.holder for lease in state.leases)
        on_hold = any(hold.holder == command.holder for hold in state.holds)
        if isinstance(command, AcquireLease | RenewLease):
            problem = bad_seconds("ttl", command.ttl, TTL_MAX)
            if problem is not None:
                return problem
        if isinstance(command, AcquireLease):
            events = [SandboxLeaseAcquired(holder=command.holder, ttl=command.ttl)]
        elif isinstance(command, RenewLease):
            if not any(lease.holder == command.holder for lease in live_leases(state, now)):
                return _reject(f"{command.holder} holds no live lease on sandbox {state.name}; acquire one")
            events = [SandboxLeaseRenewed(holder=command.holder, ttl=command.ttl)]
        elif isinstance(command, ReleaseLease):
            if not held:
                return []  # released already, or expired and never held since: nothing to record
            events = [SandboxLeaseReleased(holder=command.holder)]
        elif isinstance(command, PlaceStopHold):
            if on_hold:
                return []
            events = [SandboxStopHoldPlaced(holder=command.holder, reason=command.reason)]
        else:
            if not on_hold:
                return []
            events = [SandboxStopHoldReleased(holder=command.holder)]
    if state.warning is not None:
        # Use in the grace period: the stop (or delete) does not happen, and the log says why.
        events.insert(0, SandboxWarningCancelled(kind=state.warning.kind, cause=command.VERB))
    return events


def _warn(state: SandboxState, command: WarnSandbox, now: float) -> Decision:
    if command.kind not in (STOP, ARCHIVE, DELETE):
        return _reject(
            f"warning kind must be {STOP}, {ARCHIVE} or {DELETE}, not {command.kind!r}", ErrorCode.INVALID_ARGUMENT
        )
    problem = bad_seconds("grace", command.grace, TTL_MAX, positive=False)
    if problem is not None:
        return problem
    warning = state.warning
    if warning is not None and warning.kind == command.kind and warning.activity_seq == command.activity_seq:
        return []  # given already
    found = deadline(state)
    if found is None or found[0] != command.kind:
        return _reject(f"sandbox {state.name} is {state.phase.value} and has no {command.kind} deadline")
    if command.activity_seq != state.activity_seq:
        return _reject(
            f"sandbox {state.name} was used since: its idle clock counts from seq {state.activity_seq}, "
            f"not {command.activity_seq}"
        )
    if now < found[1]:
        return _reject(f"sandbox {state.name} is not past its deadline yet ({found[1] - now:.1f}s to go)")
    leases = live_leases(state, now)
    if leases:
        return _reject(f"sandbox {state.name} is leased by {_holders(leases)}")
    if command.kind == STOP:
        return [
            SandboxStopWarning(grace=command.grace, activity_seq=command.activity_seq, idle_timeout=state.idle_timeout)
        ]
    if command.kind == ARCHIVE:
        return [
            SandboxArchiveWarning(
                grace=command.grace, activity_seq=command.activity_seq, auto_archive_after=state.auto_archive_after
            )
        ]
    return [
        SandboxDeleteWarning(
            grace=command.grace, activity_seq=command.activity_seq, auto_delete_after=state.auto_delete_after
        )
    ]


def check_reaped(state: SandboxState, kind: str, now: float) -> Rejection | None:
    """Whether the reaper's stop (or archive, or delete) may go ahead: only after a warning for the
    current idle deadline whose grace has run out, with no live lease. Anything that used the
    sandbox since has cleared the warning, so a stop decided on a stale view is refused here."""
    expected = {STOP: (Phase.READY,), ARCHIVE: (Phase.STOPPED,), DELETE: (Phase.STOPPED, Phase.ARCHIVED)}[kind]
    what = {STOP: "idle stop", ARCHIVE: "auto-archive", DELETE: "auto-delete"}[kind]
    if state.phase not in expected:
        needs = " or ".join(phase.value for phase in expected)
        return _reject(f"sandbox {state.name} is {state.phase.value}; an {what} needs {needs}")
    warning = state.warning
    if warning is None or warning.kind != kind or warning.activity_seq != state.activity_seq:
        return _reject(f"sandbox {state.name} has no pending {kind} warning; the {what} is cancelled")
    if now < warning.deadline:
        return _reject(f"sandbox {state.name} is in its grace period ({warning.deadline - now:.1f}s to go)")
    leases = live_leases(state, now)
    if leases:
        return _reject(f"sandbox {state.name} is leased by {_holders(leases)}; the {what} is cancelled")
    return None


def check_start(state: SandboxState) -> Rejection | None:
    """A stop hold keeps the sandbox from starting until its holder releases it."""
    if not state.holds:
        return None
    held = "; ".join(f"{h.holder}" + (f" ({h.reason})" if h.reason else "") for h in state.holds)
    return _reject(
        f"sandbox {state.name} has a stop hold by {held}: it cannot start until released "
        f"(sandboxctl unhold {state.name} --holder {state.holds[0].holder})"
    )


_WARNINGS = {SandboxStopWarning: STOP, SandboxArchiveWarning: ARCHIVE, SandboxDeleteWarning: DELETE}


def fold_activity(
    state: SandboxState,
    envelope: Envelope,
    seq: int,
    phase: Phase,
    changes: dict[str, object],
    moment: float | None = None,
) -> None:
    """Add to ``changes`` what ``envelope`` does to activity, leases, holds and warnings.

    Lapsed leases are dropped at each event, by the event's own time, so the fold is the
    same whenever it runs. Phase events (the hot path of every fold) cost two attribute
    reads here; ``moment`` is the event's time as a timestamp, if the caller has it."""
    event = envelope.data
    if moment is None:
        moment = envelope.time.timestamp()
    if state.leases and any(lease.expires <= moment for lease in state.leases):
        changes["leases"] = tuple(lease for lease in state.leases if lease.expires > moment)
    if event.TRIGGER == "note":
        _fold_note(state, event, moment, changes)
    if event.ACTIVITY:
        changes["last_activity"] = moment
        changes["activity_seq"] = seq or state.seq
        if state.warning is not None:
            changes["warning"] = None
    elif state.warning is not None and (phase is not state.phase or isinstance(event, SandboxWarningCancelled)):
        changes["warning"] = None
    if isinstance(event, SandboxStopWarning | SandboxArchiveWarning | SandboxDeleteWarning):
        changes["warning"] = PendingWarning(
            kind=_WARNINGS[type(event)],
            activity_seq=event.activity_seq,
            deadline=moment + event.grace,
            grace=event.grace,
        )


def _fold_note(state: SandboxState, event: object, moment: float, changes: dict[str, object]) -> None:
    leases: tuple[Lease, ...] = changes.get("leases", state.leases)  # type: ignore[assignment]
    if isinstance(event, SandboxLeaseAcquired | SandboxLeaseRenewed):
        kept = tuple(lease for lease in leases if lease.holder != event.holder)
        changes["leases"] = (*kept, Lease(holder=event.holder, expires=moment + event.ttl))
    elif isinstance(event, SandboxLeaseReleased):
        changes["leases"] = tuple(lease for lease in leases if lease.holder != event.holder)
    elif isinstance(event, SandboxStopHoldPlaced):
        if all(hold.holder != event.holder for hold in state.holds):
            changes["holds"] = (*state.holds, Hold(holder=event.holder, reason=event.reason))
    elif isinstance(event, SandboxStopHoldReleased):
        changes["holds"] = tuple(hold for hold in state.holds if hold.holder != event.holder)
