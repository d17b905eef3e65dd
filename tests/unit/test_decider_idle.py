"""Idleness as pure logic: activity, leases, stop holds, the reaper's timers and the decider's
checks of its commands. No NATS, no engine: the clock is a parameter."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from sandboxctl.events import Envelope
from sandboxctl.events.commands import (
    AcquireLease,
    ArchiveSandbox,
    CreateSandbox,
    DeleteSandbox,
    PlaceStopHold,
    ReleaseLease,
    ReleaseStopHold,
    RenewLease,
    StartSandbox,
    StopSandbox,
    TouchSandbox,
    WarnSandbox,
)
from sandboxctl.events.envelope import type_name
from sandboxctl.events.lifecycle import (
    EVENT_TYPES,
    SandboxArchived,
    SandboxArchiveRequested,
    SandboxCreated,
    SandboxDeleteRequested,
    SandboxDeleteWarning,
    SandboxLeaseAcquired,
    SandboxReady,
    SandboxStopHoldPlaced,
    SandboxStopped,
    SandboxStopRequested,
    SandboxStopWarning,
    SandboxTouched,
    SandboxWarningCancelled,
)
from sandboxctl.events.replies import ErrorCode
from sandboxctl.services.worker import _ORDERS
from sandboxctl.statemachine import IllegalTransition, Phase, Rejection, SandboxState, decide, evolve
from sandboxctl.statemachine.idle import AUTO_ARCHIVE, AUTO_DELETE, IDLE, deadline, due
from sandboxctl.statemachine.machine import TABLE

T0 = 1_800_000_000.0
OLD_TYPES = {  # the events that move the phase; the rest are the notes of idleness
    "created",
    "stop_requested",
    "stopped",
    "start_requested",
    "ready",
    "pause_requested",
    "paused",
    "resume_requested",
    "archive_requested",
    "archived",
    "completed",
    "failed",
    "delete_requested",
    "deleted",
}


class Log:
    """A sandbox's log in memory: decide at a time, append what it says, fold it."""

    def __init__(self) -> None:
        self.state: SandboxState | None = None
        self.seq = 0
        self.types: list[str] = []

    def append(self, event: object, at: float) -> None:
        self.seq += 1
        envelope = Envelope(
            id=f"e{self.seq}",
            type=type_name(type(event)),
            source="test",
            subject="box",
            time=datetime.fromtimestamp(at, UTC),
            data=event,
        )
        self.state = evolve(self.state, envelope, self.seq)
        self.types.append(type_name(type(event)).split(".")[2])

    def run(self, command: object, at: float) -> list[object] | Rejection:
        decision = decide(self.state, command, ("podman",), at)  # type: ignore[arg-type]
        if isinstance(decision, list):
            for event in decision:
                self.append(event, at)
        return decision


def cmd(kind: type, **kw: object) -> object:
    kw.setdefault("name", "box")
    kw.setdefault("command_id", f"c-{kind.__name__}-{kw.get('holder', '')}")
    return kind(**kw)


def ready(idle_timeout: float = 10.0, auto_delete_after: float = 0.0, auto_archive_after: float = 0.0) -> Log:
    log = Log()
    created = log.run(
        cmd(
            CreateSandbox,
            image="img",
            driver="podman",
            idle_timeout=idle_timeout,
            auto_delete_after=auto_delete_after,
            auto_archive_after=auto_archive_after,
        ),
        T0,
    )
    assert isinstance(created, list)
    log.append(SandboxReady(incarnation="run-1"), T0 + 1)
    return log


def rejected(decision: object, code: ErrorCode = ErrorCode.FAILED_PRECONDITION) -> str:
    assert isinstance(decision, Rejection), decision
    assert decision.code is code, decision
    return decision.message


def test_new_events_keep_every_live_phase_and_none_follows_deleted() -> None:
    for phase in Phase:
        if phase is not Phase.DELETED:
            assert TABLE[("note", phase.value)] == phase.value
    assert ("note", Phase.DELETED.value) not in TABLE
    log = ready()
    log.append(SandboxDeleteRequested(sandbox_id="c", driver="podman"), T0 + 2)
    assert "Deleting" in rejected(log.run(cmd(TouchSandbox), T0 + 3))
    assert log.state is not None
    deleted = msgspec.structs.replace(log.state, phase=Phase.DELETED)
    touched = Envelope(
        id="x", type=type_name(SandboxTouched), source="t", subject="box", time=datetime.now(UTC), data=SandboxTouched()
    )
    with pytest.raises(IllegalTransition):
        evolve(deleted, touched, 99)
    # none of them looks like a work order to the driver worker
    new = [t for t in EVENT_TYPES if t.split(".")[2] not in OLD_TYPES]
    assert len(new) == 12 and not [t for t in new if t in _ORDERS]  # the notes (copied too), and updated


def test_create_records_the_timeouts_and_refuses_bad_ones() -> None:
    log = ready(idle_timeout=30, auto_delete_after=600)
    assert log.state is not None
    assert (log.state.idle_timeout, log.state.auto_delete_after) == (30, 600)
    assert log.state.last_activity == T0 + 1 and log.state.activity_seq == 2  # Ready is activity
    for bad in ({"idle_timeout": -1.0}, {"auto_delete_after": float("inf")}):
        message = rejected(
            Log().run(cmd(CreateSandbox, image="i", driver="podman", **bad), T0), ErrorCode.INVALID_ARGUMENT
        )
        assert "seconds" in message


def test_idle_deadline_warns_then_stops_with_ids_derived_from_the_deadline() -> None:
    log = ready(idle_timeout=10)
    state = log.state
    assert state is not None
    assert deadline(state) == ("stop", T0 + 11)
    assert due(state, T0 + 10.9, grace=5) is None
    warn = due(state, T0 + 11, grace=5)
    assert isinstance(warn, WarnSandbox)
    assert (warn.kind, warn.activity_seq, warn.grace, warn.actor) == ("stop", 2, 5, "sandboxctl/reaper")
    assert warn.command_id == f"warn-stop:{state.sandbox_id}:2"
    assert due(state, T0 + 11, grace=5) == warn  # the same deadline always gives the same command

    assert isinstance(log.run(warn, T0 + 11), list)
    assert log.types[-1] == "stop_warning"
    assert log.run(warn, T0 + 11.5) == []  # given already: a second reaper's copy appends nothing
    state = log.state
    assert state is not None and state.warning is not None and state.warning.deadline == T0 + 16
    assert state.phase is Phase.READY and state.last_activity == T0 + 1  # a warning is not use
    assert due(state, T0 + 15.9, grace=5) is None
    stop = due(state, T0 + 16, grace=5)
    assert isinstance(stop, StopSandbox)
    assert (stop.reason, stop.command_id) == (IDLE, f"idle:{state.sandbox_id}:2")

    rejected(log.run(stop, T0 + 15))  # too early on the state machine's clock
    decision = log.run(stop, T0 + 16)
    assert isinstance(decision, list) and isinstance(decision[0], SandboxStopRequested)
    assert decision[0].reason == IDLE
    assert log.run(stop, T0 + 17) == []  # fired once: a repeat finds Stopping
    log.append(SandboxStopped(exit_code=0), T0 + 18)
    assert due(log.state, T0 + 10_000, grace=5) is None  # type: ignore[arg-type]  # Stopped, no auto-delete: never deleted


def test_a_touch_in_the_grace_period_cancels_the_stop_and_restarts_the_clock() -> None:
    log = ready(idle_timeout=10)
    assert log.state is not None
    warn = due(log.state, T0 + 11, grace=5)
    log.run(warn, T0 + 11)
    stop = due(log.state, T0 + 16, grace=5)  # type: ignore[arg-type]
    decision = log.run(cmd(TouchSandbox, actor="alice"), T0 + 13)
    assert isinstance(decision, list)
    assert [type(e) for e in decision] == [SandboxWarningCancelled, SandboxTouched]
    assert isinstance(decision[0], SandboxWarningCancelled) and decision[0].cause == "touch"
    state = log.state
    assert state is not None and state.warning is None and state.last_activity == T0 + 13
    # a reaper that had not seen the touch yet: the decider refuses its stop
    assert "no pending stop warning" in rejected(log.run(stop, T0 + 16))
    assert log.run(warn, T0 + 16) != []  # its stale warning too (a rejection, not a new warning)
    assert isinstance(log.run(warn, T0 + 16), Rejection)
    assert deadline(state) == ("stop", T0 + 23)
    fresh = due(state, T0 + 23, grace=5)
    assert isinstance(fresh, WarnSandbox) and fresh.activity_seq == state.activity_seq != warn.activity_seq  # type: ignore[union-attr]


def test_a_live_lease_keeps_the_sandbox_and_its_expiry_bounds_the_deadline() -> None:
    log = ready(idle_timeout=10)
    assert isinstance(log.run(cmd(AcquireLease, holder="agent-7", ttl=60), T0 + 2), list)
    state = log.state
    assert state is not None and [(x.holder, x.expires) for x in state.leases] == [("agent-7", T0 + 62)]
    assert deadline(state) == ("stop", T0 + 62)
    assert due(state, T0 + 40, grace=5) is None
    # a warning asked for anyway (a reaper behind on the log) is refused while the lease lives
    stale = WarnSandbox(name="box", command_id="w", kind="stop", activity_seq=state.activity_seq, grace=5)
    assert "not past its deadline" in rejected(log.run(stale, T0 + 40))
    assert isinstance(log.run(cmd(RenewLease, holder="agent-7", ttl=60), T0 + 50), list)
    assert log.state is not None and log.state.leases[0].expires == T0 + 110
    assert isinstance(due(log.state, T0 + 110, grace=5), WarnSandbox)  # lapsed: the holder is gone
    # renewing a lapsed lease is refused; acquiring again works; releasing twice is a no-op
    assert "no live lease" in rejected(log.run(cmd(RenewLease, holder="agent-7", ttl=60), T0 + 111))
    assert "no live lease" in rejected(log.run(cmd(RenewLease, holder="nobody", ttl=60), T0 + 111))
    assert isinstance(log.run(cmd(AcquireLease, holder="agent-7", ttl=60), T0 + 112), list)
    assert isinstance(log.run(cmd(ReleaseLease, holder="agent-7"), T0 + 113), list)
    assert log.run(cmd(ReleaseLease, holder="agent-7", command_id="again"), T0 + 114) == []
    assert log.state is not None and log.state.leases == ()
    for bad in ({"holder": "", "ttl": 5.0}, {"holder": "a", "ttl": 0.0}, {"holder": "a", "ttl": -3.0}):
        rejected(log.run(cmd(AcquireLease, **bad), T0 + 115), ErrorCode.INVALID_ARGUMENT)


def test_lapsed_leases_are_dropped_by_the_time_of_the_next_event() -> None:
    log = ready(idle_timeout=0)
    log.run(cmd(AcquireLease, holder="a", ttl=5), T0 + 2)
    log.run(cmd(AcquireLease, holder="b", ttl=50), T0 + 2)
    log.run(cmd(TouchSandbox), T0 + 10)
    assert log.state is not None and [x.holder for x in log.state.leases] == ["b"]
    assert due(log.state, T0 + 1_000_000, grace=5) is None  # idle_timeout 0: never stopped


def test_a_stop_hold_blocks_start_naming_its_holder_until_released() -> None:
    log = ready()
    log.append(SandboxStopRequested(sandbox_id="x", driver="podman"), T0 + 2)
    log.append(SandboxStopped(exit_code=0), T0 + 3)
    decision = log.run(cmd(PlaceStopHold, holder="ops-7", reason="disk audit"), T0 + 4)
    assert isinstance(decision, list) and isinstance(decision[0], SandboxStopHoldPlaced)
    assert log.run(cmd(PlaceStopHold, holder="ops-7", command_id="again"), T0 + 4) == []
    message = rejected(log.run(cmd(StartSandbox), T0 + 5))
    assert "ops-7" in message and "disk audit" in message and "stop hold" in message
    assert log.state is not None and log.state.phase is Phase.STOPPED
    assert isinstance(log.run(cmd(ReleaseStopHold, holder="ops-7"), T0 + 6), list)
    assert log.run(cmd(ReleaseStopHold, holder="ops-7", command_id="again"), T0 + 6) == []
    started = log.run(cmd(StartSandbox, command_id="s2"), T0 + 7)
    assert isinstance(started, list) and started
    # a hold does not stop a Ready sandbox, and start on Ready stays a no-op
    log.append(SandboxReady(incarnation="run-2"), T0 + 8)
    log.run(cmd(PlaceStopHold, holder="ops-8"), T0 + 9)
    assert log.state is not None and log.state.phase is Phase.READY
    assert log.run(cmd(StartSandbox, command_id="s3"), T0 + 10) == []


def test_auto_delete_is_opt_in_warned_and_graced() -> None:
    log = ready(idle_timeout=10, auto_delete_after=100)
    log.append(SandboxStopRequested(sandbox_id="x", driver="podman"), T0 + 2)
    log.append(SandboxStopped(exit_code=0), T0 + 3)
    state = log.state
    assert state is not None and deadline(state) == ("delete", T0 + 103)
    assert due(state, T0 + 102, grace=5) is None
    warn = due(state, T0 + 103, grace=5)
    assert isinstance(warn, WarnSandbox) and warn.kind == "delete"
    log.run(warn, T0 + 103)
    assert log.types[-1] == "delete_warning"
    delete = due(log.state, T0 + 108, grace=5)  # type: ignore[arg-type]
    assert isinstance(delete, DeleteSandbox) and delete.reason == AUTO_DELETE
    assert delete.command_id.startswith("auto-delete:")
    decision = log.run(delete, T0 + 108)
    assert isinstance(decision, list) and isinstance(decision[0], SandboxDeleteRequested)
    assert decision[0].reason == AUTO_DELETE
    # an auto-delete without its warning, or of a Ready sandbox, is refused
    other = ready(idle_timeout=10, auto_delete_after=100)
    rejected(other.run(DeleteSandbox(name="box", command_id="d", reason=AUTO_DELETE), T0 + 500))
    # and never for a sandbox that did not opt in
    plain = ready(idle_timeout=10)
    plain.append(SandboxStopRequested(sandbox_id="x", driver="podman"), T0 + 2)
    plain.append(SandboxStopped(exit_code=0), T0 + 3)
    assert due(plain.state, T0 + 10**9, grace=5) is None  # type: ignore[arg-type]
    refused = WarnSandbox(name="box", command_id="w", kind="delete", activity_seq=4, grace=5)
    rejected(plain.run(refused, T0 + 10**9))


def stopped(log: Log) -> Log:
    log.append(SandboxStopRequested(sandbox_id="x", driver="podman"), T0 + 2)
    log.append(SandboxStopped(exit_code=0), T0 + 3)
    return log


def test_auto_archive_is_opt_in_warned_and_graced_and_an_archived_sandbox_may_still_be_auto_deleted() -> None:
    log = stopped(ready(idle_timeout=10, auto_archive_after=100, auto_delete_after=1000))
    state = log.state
    assert state is not None and state.auto_archive_after == 100
    assert deadline(state) == ("archive", T0 + 103)
    assert due(state, T0 + 102, grace=5) is None
    warn = due(state, T0 + 103, grace=5)
    assert isinstance(warn, WarnSandbox) and warn.kind == "archive"
    log.run(warn, T0 + 103)
    assert log.types[-1] == "archive_warning"
    assert due(log.state, T0 + 107, grace=5) is None  # type: ignore[arg-type]  # its grace
    archive = due(log.state, T0 + 108, grace=5)  # type: ignore[arg-type]
    assert isinstance(archive, ArchiveSandbox) and archive.reason == AUTO_ARCHIVE
    assert archive.command_id.startswith("auto-archive:")
    decision = log.run(archive, T0 + 108)
    assert isinstance(decision, list) and isinstance(decision[0], SandboxArchiveRequested)
    assert decision[0].reason == AUTO_ARCHIVE
    log.append(SandboxArchived(object="box/x", digest="SHA-256=x", size=1), T0 + 110)
    assert log.state is not None and log.state.phase is Phase.ARCHIVED
    # Archived, its auto-delete counts from the archive's end, the last event that used it
    assert deadline(log.state) == ("delete", T0 + 1110)
    # an auto-archive without its warning, or of a sandbox not Stopped, is refused
    other = ready(idle_timeout=10, auto_archive_after=100)
    rejected(other.run(ArchiveSandbox(name="box", command_id="a", reason=AUTO_ARCHIVE), T0 + 500))
    unwarned = stopped(ready(auto_archive_after=100))
    assert "no pending archive warning" in rejected(
        unwarned.run(ArchiveSandbox(name="box", command_id="a", reason=AUTO_ARCHIVE), T0 + 500)
    )
    # an auto-delete due no later than the archive comes first: nothing is archived to be deleted
    both = stopped(ready(auto_archive_after=100, auto_delete_after=100))
    assert deadline(both.state) == ("delete", T0 + 103)  # type: ignore[arg-type]
    # and no archive for a sandbox that did not opt in
    assert deadline(stopped(ready()).state) is None  # type: ignore[arg-type]
    for bad in (-1.0, float("nan"), 10.0**12):
        problem = rejected(
            Log().run(cmd(CreateSandbox, image="i", auto_archive_after=bad), T0), ErrorCode.INVALID_ARGUMENT
        )
        assert "auto_archive_after" in problem


def test_a_touch_on_a_stopped_sandbox_postpones_its_auto_delete() -> None:
    log = ready(auto_delete_after=100)
    log.append(SandboxStopRequested(sandbox_id="x", driver="podman"), T0 + 2)
    log.append(SandboxStopped(exit_code=0), T0 + 3)
    log.run(due(log.state, T0 + 103, grace=5), T0 + 103)  # type: ignore[arg-type]
    decision = log.run(cmd(AcquireLease, holder="keeper", ttl=1), T0 + 104)
    assert isinstance(decision, list) and isinstance(decision[0], SandboxWarningCancelled)
    assert isinstance(decision[1], SandboxLeaseAcquired)
    assert log.state is not None and log.state.warning is None
    assert deadline(log.state) == ("delete", T0 + 204)


def test_without_a_clock_nothing_is_reaped() -> None:
    log = ready(idle_timeout=10)
    log.run(due(log.state, T0 + 11, grace=0), T0 + 11)  # type: ignore[arg-type]
    stop = StopSandbox(name="box", command_id="s", reason=IDLE)
    assert isinstance(decide(log.state, stop, ("podman",)), Rejection)  # now=0: the grace never ends


def test_the_warning_events_are_not_activity_and_folding_is_deterministic() -> None:
    assert not SandboxStopWarning.ACTIVITY and not SandboxDeleteWarning.ACTIVITY
    assert not SandboxWarningCancelled.ACTIVITY and SandboxTouched.ACTIVITY and SandboxCreated.ACTIVITY
    one, two = ready(idle_timeout=10), ready(idle_timeout=10)
    for log in (one, two):
        log.run(cmd(AcquireLease, holder="a", ttl=3), T0 + 2)
        log.run(due(log.state, T0 + 12, grace=2), T0 + 12)  # type: ignore[arg-type]  # the lease's acquire was use
        log.run(cmd(PlaceStopHold, holder="h"), T0 + 13)
    assert one.state == two.state
    assert one.types == ["created", "ready", "lease_acquired", "stop_warning", "warning_cancelled", "stop_hold_placed"]
