"""Pure state-machine logic: no NATS, no engine."""

from __future__ import annotations

import msgspec
import pytest

from sandboxctl.events import (
    ContainerCreated,
    ContainerExited,
    ContainerOrphaned,
    ContainerRemoved,
    ContainerStarted,
    CreateSandbox,
    DeleteSandbox,
    DriverFailed,
    Envelope,
    SandboxCreated,
    StartSandbox,
    StopSandbox,
    TouchSandbox,
    now,
)
from sandboxctl.events.commands import ArchiveSandbox, PauseSandbox, ResumeSandbox, UpdateSandbox, command_decoder
from sandboxctl.events.envelope import type_name
from sandboxctl.events.facts import ContainerPaused, ContainerResumed, WorkspaceArchived
from sandboxctl.events.lifecycle import (
    SandboxArchiveRequested,
    SandboxCompleted,
    SandboxDeleteRequested,
    SandboxFailed,
    SandboxPauseRequested,
    SandboxReady,
    SandboxStartRequested,
    SandboxStopped,
    SandboxStopRequested,
    SandboxUpdated,
)
from sandboxctl.events.limits import VM_MEMORY_MIN
from sandboxctl.events.replies import ErrorCode
from sandboxctl.events.spec import Resources
from sandboxctl.statemachine import (
    BACKEND_MISSING,
    IllegalTransition,
    Phase,
    Rejection,
    SandboxState,
    decide,
    evolve,
    react,
)
from sandboxctl.statemachine.machine import MACHINE


def state(phase: Phase, incarnation: str = "run-1") -> SandboxState:
    return SandboxState(name="box", sandbox_id="id-1", phase=phase, driver="podman", seq=7, incarnation=incarnation)


def env(event: object, name: str = "box") -> Envelope:
    return Envelope(id="e", type=type_name(type(event)), source="test", subject=name, time=now(), data=event)


def cmd(kind: type, **kw: object) -> object:
    kw.setdefault("name", "box")
    kw.setdefault("command_id", "c-1")
    if kind is CreateSandbox:
        kw.setdefault("image", "img")
        kw.setdefault("driver", "podman")
    return kind(**kw)


def test_create_then_fold() -> None:
    events = decide(None, cmd(CreateSandbox))
    assert isinstance(events, list) and isinstance(events[0], SandboxCreated)
    folded = evolve(None, env(events[0]), seq=1)
    assert folded.phase is Phase.PROVISIONING and folded.seq == 1 and folded.sandbox_id == "c-1"


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (cmd(CreateSandbox, name=""), ErrorCode.INVALID_ARGUMENT),
        (cmd(CreateSandbox, name="has.dot"), ErrorCode.INVALID_ARGUMENT),
        (cmd(CreateSandbox, image=" "), ErrorCode.INVALID_ARGUMENT),
        (cmd(CreateSandbox, driver="lxc"), ErrorCode.INVALID_ARGUMENT),
        (cmd(StopSandbox), ErrorCode.NOT_FOUND),
        (cmd(StartSandbox), ErrorCode.NOT_FOUND),
        (cmd(DeleteSandbox), ErrorCode.NOT_FOUND),
    ],
)
def test_rejections_without_state(command: object, code: ErrorCode) -> None:
    decision = decide(None, command)  # type: ignore[arg-type]
    assert isinstance(decision, Rejection) and decision.code is code


def test_create_existing_is_already_exists_but_its_own_retry_is_a_noop() -> None:
    existing = state(Phase.READY)
    rejected = decide(existing, cmd(CreateSandbox, command_id="other"))
    assert isinstance(rejected, Rejection) and rejected.code is ErrorCode.ALREADY_EXISTS
    assert decide(existing, cmd(CreateSandbox, command_id="id-1")) == []


def test_name_is_free_again_after_delete() -> None:
    assert isinstance(decide(state(Phase.DELETED), cmd(CreateSandbox))[0], SandboxCreated)  # type: ignore[index]


@pytest.mark.parametrize(
    ("phase", "command", "outcome"),
    [
        (Phase.READY, StopSandbox, "append"),
        (Phase.STOPPING, StopSandbox, "noop"),
        (Phase.STOPPED, StopSandbox, "noop"),
        (Phase.PROVISIONING, StopSandbox, "reject"),
        (Phase.STARTING, StopSandbox, "reject"),
        (Phase.ERROR, StopSandbox, "reject"),
        (Phase.STOPPED, StartSandbox, "append"),
        (Phase.ERROR, StartSandbox, "append"),
        (Phase.READY, StartSandbox, "noop"),
        (Phase.STARTING, StartSandbox, "noop"),
        (Phase.STOPPING, StartSandbox, "reject"),
        (Phase.PROVISIONING, StartSandbox, "reject"),
        (Phase.DELETED, StartSandbox, "not_found"),
        (Phase.DELETED, StopSandbox, "not_found"),
        (Phase.DELETED, DeleteSandbox, "noop"),
        (Phase.DELETING, DeleteSandbox, "noop"),
    ]
    + [(p, DeleteSandbox, "append") for p in Phase if p not in (Phase.DELETED, Phase.DELETING)],
)
def test_command_table(phase: Phase, command: type, outcome: str) -> None:
    decision = decide(state(phase), cmd(command))
    if outcome == "append":
        assert isinstance(decision, list) and len(decision) == 1
        assert evolve(state(phase), env(decision[0])).phase in (Phase.STOPPING, Phase.STARTING, Phase.DELETING)
    elif outcome == "noop":
        assert decision == []
    elif outcome == "not_found":
        assert isinstance(decision, Rejection) and decision.code is ErrorCode.NOT_FOUND
    else:
        assert isinstance(decision, Rejection) and decision.code is ErrorCode.FAILED_PRECONDITION


def test_rejection_names_the_phase_and_what_is_allowed() -> None:
    decision = decide(state(Phase.PROVISIONING), cmd(StopSandbox))
    assert isinstance(decision, Rejection)
    assert (
        decision.message
        == "sandbox box is Provisioning; stop is allowed in Ready, Stopping, Stopped, Paused or Completed"
    )


def test_exit_while_stopping_is_stopped_and_while_ready_is_error() -> None:
    exit_137 = ContainerExited(exit_code=137, incarnation="run-1")
    assert react(state(Phase.STOPPING), exit_137) == [SandboxStopped(exit_code=137)]
    (failed,) = react(state(Phase.READY), exit_137)
    assert isinstance(failed, SandboxFailed) and "137" in failed.reason and failed.exit_code == 137
    assert evolve(state(Phase.READY), env(failed)).phase is Phase.ERROR


def test_stale_exit_from_an_earlier_run_is_ignored() -> None:
    assert react(state(Phase.READY, incarnation="run-2"), ContainerExited(exit_code=1, incarnation="run-1")) == []


def test_start_fact_makes_ready_and_records_incarnation() -> None:
    for phase in (Phase.PROVISIONING, Phase.STARTING, Phase.STOPPED, Phase.ERROR):
        (ready,) = react(state(phase), ContainerStarted(incarnation="run-9"))
        after = evolve(state(phase), env(ready))
        assert after.phase is Phase.READY and after.incarnation == "run-9"
    assert react(state(Phase.READY), ContainerStarted(incarnation="run-1")) == []


def test_failures_and_removals() -> None:
    (failed,) = react(state(Phase.STOPPING), DriverFailed(operation="stop", message="engine down"))
    assert isinstance(failed, SandboxFailed) and "engine down" in failed.reason
    assert evolve(state(Phase.STOPPING), env(failed)).phase is Phase.ERROR
    (gone,) = react(state(Phase.STOPPED), ContainerRemoved())
    assert isinstance(gone, SandboxFailed) and gone.reason == "backend_missing"
    # Only the delete's own report (workspace gone too) ends Deleting; a watcher's sighting does not.
    assert react(state(Phase.DELETING), ContainerRemoved()) == []
    deleted = react(state(Phase.DELETING), ContainerRemoved(workspace_removed=True))
    assert [type(e).__name__ for e in deleted] == ["SandboxDeleted"]
    assert react(state(Phase.PROVISIONING), ContainerCreated()) == []
    assert react(state(Phase.DELETED), DriverFailed(operation="x", message="y")) == []


def test_evolve_refuses_an_illegal_event() -> None:
    with pytest.raises(IllegalTransition):
        evolve(state(Phase.STOPPED), env(SandboxStopped(exit_code=0)))
    with pytest.raises(IllegalTransition):
        evolve(None, env(SandboxReady()))
    with pytest.raises(IllegalTransition):
        evolve(state(Phase.PROVISIONING), env(SandboxStopRequested(sandbox_id="x", driver="podman")))


def test_one_static_machine_without_models() -> None:
    assert MACHINE.models == []
    assert set(MACHINE.states) == {"Absent", *(p.value for p in Phase)}


def test_a_stale_exit_while_starting_does_not_fail_the_new_run() -> None:
    # Error after run-1 died; start requested; the watcher's late copy of run-1's exit arrives.
    assert react(state(Phase.STARTING, incarnation="run-1"), ContainerExited(exit_code=137, incarnation="run-1")) == []


def test_facts_about_an_earlier_sandbox_of_the_same_name_are_ignored() -> None:
    assert react(state(Phase.READY), ContainerRemoved(sandbox_id="old-id")) == []
    assert react(state(Phase.READY), ContainerExited(exit_code=1, sandbox_id="old-id", incarnation="run-1")) == []
    (failed,) = react(state(Phase.READY), ContainerRemoved(sandbox_id="id-1"))
    assert isinstance(failed, SandboxFailed) and failed.reason == BACKEND_MISSING


def test_the_same_failure_twice_is_recorded_once() -> None:
    errored = SandboxState(
        name="box", sandbox_id="id-1", phase=Phase.ERROR, driver="podman", last_error=BACKEND_MISSING
    )
    assert react(errored, ContainerRemoved()) == []
    (again,) = react(errored, DriverFailed(operation="start", message="engine down"))
    assert again.reason == "start failed: engine down"


def test_an_orphan_report_moves_no_phase() -> None:
    assert react(None, ContainerOrphaned(reason="no sandbox in the log")) == []
    assert react(state(Phase.READY), ContainerOrphaned(reason="x")) == []


def test_deadlines_fail_an_overdue_transient_phase_with_timeout() -> None:
    from sandboxctl.statemachine.deadlines import TIMEOUT, overdue, parse_deadlines

    deadlines = parse_deadlines("podman.Stopping=5, *.Starting=7")
    stopping = SandboxState(name="b", sandbox_id="i", phase=Phase.STOPPING, driver="podman", since=100.0)
    assert overdue(stopping, 104.9, deadlines) == []
    (failed,) = overdue(stopping, 105.0, deadlines)
    assert failed.reason == TIMEOUT and failed.kind == TIMEOUT and failed.operation == "stop"
    starting = SandboxState(name="b", sandbox_id="i", phase=Phase.STARTING, driver="docker", since=100.0)
    assert overdue(starting, 106.0, deadlines) == [] and overdue(starting, 107.0, deadlines)
    assert overdue(SandboxState(name="b", sandbox_id="i", phase=Phase.READY, driver="podman"), 1e12, deadlines) == []
    with pytest.raises(ValueError):
        parse_deadlines("podman.Ready=5")


def test_a_late_report_of_an_older_run_never_moves_the_sandbox() -> None:
    from sandboxctl.statemachine.decider import started_before

    old, new = "2026-11-29T08:20:06.314641231Z", "2026-11-29T08:20:09.716079115Z"
    assert started_before(old, new) and not started_before(new, old) and not started_before(new, new)
    assert started_before("2026-11-29T08:20:09.7Z", "2026-11-29T08:20:09.71Z")  # trimmed nanoseconds
    # Ready on the newer run: a reconciliation's stale "started" of the older run changes nothing.
    assert react(state(Phase.READY, incarnation=new), ContainerStarted(incarnation=old)) == []
    (ready,) = react(state(Phase.READY, incarnation=old), ContainerStarted(incarnation=new))
    assert ready.incarnation == new
    # Stopped: the run that was stopped is not running again; only a newer run is a start made outside.
    assert react(state(Phase.STOPPED, incarnation=new), ContainerStarted(incarnation=new)) == []
    assert react(state(Phase.STOPPED, incarnation=old), ContainerStarted(incarnation=new))
    # Error: a failure may not have stopped the run, so the same run still running is Ready.
    assert react(state(Phase.ERROR, incarnation=new), ContainerStarted(incarnation=new))
    assert react(state(Phase.ERROR, incarnation=new), ContainerStarted(incarnation=old)) == []


def test_a_run_that_ended_never_makes_the_sandbox_ready_again() -> None:
    """The race suite's late watcher copy: run-1 stopped, a start won, and run-1's own
    ContainerStarted arrives while Starting. It must wait for the new run."""
    old, new = "2026-11-29T08:20:09.100Z", "2026-11-29T08:20:11.200Z"
    stopping = evolve(
        state(Phase.READY, incarnation=old), env(SandboxStopRequested(sandbox_id="id-1", driver="podman")), seq=8
    )
    stopped = evolve(stopping, env(SandboxStopped(exit_code=0)), seq=9)
    assert stopped.ended == old
    starting = msgspec.structs.replace(stopped, phase=Phase.STARTING)
    assert react(starting, ContainerStarted(incarnation=old)) == []
    (ready,) = react(starting, ContainerStarted(incarnation=new))
    assert ready.incarnation == new

    crashed = evolve(state(Phase.READY, incarnation=old), env(SandboxFailed(kind="exited", reason="exit 1")), seq=8)
    assert crashed.ended == old
    assert react(crashed, ContainerStarted(incarnation=old)) == []
    assert react(msgspec.structs.replace(crashed, phase=Phase.STARTING), ContainerStarted(incarnation=old)) == []
    assert react(crashed, ContainerStarted(incarnation=new))

    # A driver failure leaves the run alive: starting it again may report that very run.
    broken = evolve(state(Phase.READY, incarnation=old), env(SandboxFailed(kind="driver", reason="stop failed")), seq=8)
    assert broken.ended == ""
    assert react(msgspec.structs.replace(broken, phase=Phase.STARTING), ContainerStarted(incarnation=old))


def test_the_answer_to_a_start_may_name_a_run_recorded_as_ended() -> None:
    """A failure recorded for a run that is in fact still up (an old writer, a lost race): the
    start work order's own report, made after the request, is the truth and ends Starting;
    the same report observed by a watcher may be a late copy and moves nothing."""
    run = "2026-11-29T08:20:09.100Z"
    failed = evolve(state(Phase.READY, incarnation=run), env(SandboxFailed(kind="exited", reason="exit 3")), seq=8)
    start = Envelope(
        id="req-9",
        type=type_name(SandboxStartRequested),
        source="test",
        subject="box",
        time=now(),
        data=SandboxStartRequested(sandbox_id="id-1", driver="podman"),
    )
    starting = evolve(failed, start, seq=9)
    assert starting.request_id == "req-9"
    assert react(starting, ContainerStarted(incarnation=run)) == []
    assert react(starting, ContainerStarted(incarnation=run, request_id="req-1")) == []
    (ready,) = react(starting, ContainerStarted(incarnation=run, request_id="req-9"))
    assert ready.incarnation == run


def at(moment: float) -> object:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(moment, UTC)


def test_a_second_stop_with_a_shorter_grace_shortens_the_wait_and_a_longer_one_changes_nothing() -> None:
    ready = state(Phase.READY)
    (first,) = decide(ready, cmd(StopSandbox, timeout=600.0), now=1000.0)  # type: ignore[arg-type,misc]
    stopping = evolve(ready, msgspec.structs.replace(env(first), time=at(1000.0)), seq=8)
    assert stopping.phase is Phase.STOPPING and stopping.stop_by == 1600.0
    # a retry of the same stop, or a longer grace: the pending one stands
    assert decide(stopping, cmd(StopSandbox, timeout=600.0), now=1000.2) == []  # type: ignore[arg-type]
    assert decide(stopping, cmd(StopSandbox, timeout=3000.0), now=1100.0) == []  # type: ignore[arg-type]
    # a grace that ends sooner: asked again, recorded, and the SIGKILL comes at the earlier time
    (second,) = decide(stopping, cmd(StopSandbox, command_id="c-2", timeout=1.0), now=1100.0)  # type: ignore[arg-type,misc]
    assert isinstance(second, SandboxStopRequested) and second.timeout == 1.0
    shorter = evolve(stopping, msgspec.structs.replace(env(second), id="e2", time=at(1100.0)), seq=9)
    assert shorter.phase is Phase.STOPPING and shorter.stop_by == 1101.0 and shorter.request_id == "e2"
    assert shorter.since == stopping.since  # still the same Stopping
    # and the watchdog's deadline of a stop counts from the end of its grace
    from sandboxctl.statemachine.deadlines import overdue

    long_stop = msgspec.structs.replace(stopping, since=1000.0)
    assert overdue(long_stop, 1000.0 + 310, {}) == []  # the default 300 s would have failed it mid-grace
    assert overdue(long_stop, 1600.0 + 300, {})


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 1e300, 3600.5])
def test_a_stop_grace_out_of_range_is_invalid(timeout: float) -> None:
    decision = decide(state(Phase.READY), cmd(StopSandbox, timeout=timeout))  # type: ignore[arg-type]
    assert isinstance(decision, Rejection) and decision.code is ErrorCode.INVALID_ARGUMENT
    assert "timeout" in decision.message


def test_a_create_is_bounded_beyond_each_field_and_keeps_sandboxctls_labels_its_own() -> None:
    from sandboxctl.events.limits import COMMAND_ARG_MAX, COMMAND_BYTES_MAX

    args = ["x" * COMMAND_ARG_MAX] * (COMMAND_BYTES_MAX // COMMAND_ARG_MAX + 1)
    big = decide(None, cmd(CreateSandbox, command=args))  # type: ignore[arg-type]
    assert isinstance(big, Rejection) and big.code is ErrorCode.INVALID_ARGUMENT
    ours = decide(None, cmd(CreateSandbox, labels={"sandboxctl.sandbox_id": "someone-else"}))  # type: ignore[arg-type]
    assert isinstance(ours, Rejection) and ours.code is ErrorCode.INVALID_ARGUMENT
    assert isinstance(decide(None, cmd(CreateSandbox, labels={"team": "red"})), list)  # type: ignore[arg-type]


def test_every_command_field_is_bounded_at_decoding() -> None:
    """The contract's bounds (events/limits.py) hold where a command enters: msgspec refuses it."""
    from sandboxctl.events.commands import command_decoder

    def stop(**fields: object) -> bytes:
        return msgspec.json.encode({"type": "sandboxctl.command.stop.v1", "name": "box", "command_id": "c", **fields})

    for bad in (
        stop(timeout=1e300),
        stop(timeout=-1),
        stop(command_id="x" * 129),
        stop(command_id="a/b"),  # "/" keeps the ids of facts' and users' events apart
        stop(command_id=""),
        stop(actor="a" * 201),
        stop(reason="r" * 513),
        msgspec.json.encode(
            {
                "type": "sandboxctl.command.create.v1",
                "name": "b",
                "command_id": "c",
                "image": "i",
                "labels": {f"k{i}": "v" for i in range(65)},
            }
        ),
        msgspec.json.encode(
            {
                "type": "sandboxctl.command.create.v1",
                "name": "b",
                "command_id": "c",
                "image": "i",
                "labels": {"k": "v" * 257},
            }
        ),
    ):
        with pytest.raises(msgspec.ValidationError):
            command_decoder.decode(bad)
    assert command_decoder.decode(stop(timeout=3600, command_id="idle:abc:12")).timeout == 3600.0  # type: ignore[union-attr]


def test_an_entry_that_cannot_be_folded_is_skipped_but_moves_the_sandboxs_position() -> None:
    from sandboxctl.bus.eventlog import fold_logged
    from sandboxctl.events.envelope import encode
    from sandboxctl.statemachine.decider import skip

    ready = state(Phase.READY)
    for data, why in (
        (b"\x00garbage", "unreadable"),
        (encode(env(SandboxStopped(exit_code=0))), "not allowed"),  # Stopped does not follow Ready
        (encode(env(SandboxStopRequested(sandbox_id="id-1", driver="podman"), name="other")), "names sandbox"),
    ):
        after, _, problem = fold_logged(ready, "box", data, 9)
        assert why in problem and after is not None
        assert after.seq == 9 and msgspec.structs.replace(after, seq=ready.seq) == ready
    # a sandbox with no state has no position to move; nothing is made up for it
    assert fold_logged(None, "box", b"\x00", 3) == (None, None, fold_logged(None, "box", b"\x00", 3)[2])
    assert skip(None, 3) is None and skip(ready, 5) is ready  # never moves a position back
    folded, envelope, problem = fold_logged(
        ready, "box", encode(env(SandboxStopRequested(sandbox_id="id-1", driver="podman"))), 9
    )
    assert problem == "" and envelope is not None and folded is not None and folded.phase is Phase.STOPPING


def test_a_stop_that_failed_for_us_but_the_engine_did_is_stopped_when_its_exit_is_seen() -> None:
    """The engine went away (or stayed silent) in the middle of a stop, so the stop failed as far
    as sandboxctl could tell; once the engine answers again and shows the run ended, the phase
    follows it: Stopped, not Error. A crash, or a failed start, stays Error."""
    run = "2026-12-01T10:00:00Z"
    stopping = evolve(
        state(Phase.READY, incarnation=run), env(SandboxStopRequested(sandbox_id="id-1", driver="podman"))
    )
    (failed,) = react(stopping, DriverFailed(operation="stop", message="GET operation failed"))
    broken = evolve(stopping, env(failed), seq=9)
    assert broken.phase is Phase.ERROR and broken.failed_operation == "stop"
    (stopped,) = react(broken, ContainerExited(exit_code=0, incarnation=run))
    assert isinstance(stopped, SandboxStopped) and evolve(broken, env(stopped), seq=10).phase is Phase.STOPPED
    assert evolve(broken, env(stopped), seq=10).failed_operation == ""
    assert react(broken, ContainerExited(exit_code=0, incarnation="2026-12-01T09:00:00Z")) == []  # an older run
    crashed = evolve(state(Phase.READY, incarnation=run), env(SandboxFailed(kind="exited", reason="exit 3")), seq=8)
    assert react(crashed, ContainerExited(exit_code=3, incarnation=run)) == []
    start_failed = evolve(
        state(Phase.STARTING, incarnation=run), env(SandboxFailed(kind="driver", reason="x", operation="start")), seq=8
    )
    assert react(start_failed, ContainerExited(exit_code=0, incarnation=run)) == []


def test_a_delete_the_engine_refused_keeps_the_engines_reason_when_the_removal_is_seen_late() -> None:
    """The delete removed the container, then the engine refused the workspace volume: the sandbox
    is in Error with the engine's reason. The watcher's report of that same removal, arriving after,
    must not replace the reason with backend_missing (a user would lose why the delete failed)."""
    deleting = evolve(state(Phase.READY), env(SandboxDeleteRequested(sandbox_id="id-1", driver="podman")), seq=8)
    (failed,) = react(deleting, DriverFailed(operation="delete", message="volume is in use by container 3f2a"))
    broken = evolve(deleting, env(failed), seq=9)
    assert broken.phase is Phase.ERROR and "in use" in broken.last_error
    assert react(broken, ContainerRemoved(container_id="c1", sandbox_id="id-1")) == []
    # a removal after a failed stop (the container gone behind sandboxctl's back) is still news
    stop_failed = evolve(
        state(Phase.READY), env(SandboxFailed(kind="driver", reason="stop failed: x", operation="stop")), seq=8
    )
    (missing,) = react(stop_failed, ContainerRemoved(container_id="c1", sandbox_id="id-1"))
    assert isinstance(missing, SandboxFailed) and missing.reason == BACKEND_MISSING


# -- jobs: a main process that exits 0 on its own is Completed -------------------------------


def test_an_exit_0_on_its_own_is_completed_and_any_other_exit_is_still_error() -> None:
    for phase in (Phase.READY, Phase.STARTING, Phase.PROVISIONING):
        (done,) = react(state(phase, incarnation=""), ContainerExited(exit_code=0, incarnation="run-2"))
        assert isinstance(done, SandboxCompleted) and done.incarnation == "run-2"
        after = evolve(state(phase, incarnation=""), env(done))
        assert after.phase is Phase.COMPLETED and after.last_error == ""
    (failed,) = react(state(Phase.READY), ContainerExited(exit_code=3, incarnation="run-1"))
    assert isinstance(failed, SandboxFailed) and failed.exit_code == 3
    (oom,) = react(state(Phase.READY), ContainerExited(exit_code=0, oom=True, incarnation="run-1"))
    assert isinstance(oom, SandboxFailed)  # killed for memory is no job done, whatever the code
    # an exit 0 while stopping is the stop, not a job that completed
    assert react(state(Phase.STOPPING), ContainerExited(exit_code=0, incarnation="run-1")) == [
        SandboxStopped(exit_code=0)
    ]


def test_a_completed_job_runs_again_on_start_and_its_late_start_report_changes_nothing() -> None:
    # The job completed before the report of its start came in: that report must not make it Ready.
    provisioning = state(Phase.PROVISIONING, incarnation="")
    completed = evolve(provisioning, env(SandboxCompleted(incarnation="run-1")))
    assert completed.phase is Phase.COMPLETED and completed.incarnation == completed.ended == "run-1"
    late = ContainerStarted(incarnation="run-1", request_id=completed.request_id or "created")
    assert react(completed, late) == []
    # start runs it again; stop has nothing to stop; delete deletes
    (start,) = decide(completed, cmd(StartSandbox))  # type: ignore[misc]
    assert isinstance(start, SandboxStartRequested)
    starting = evolve(completed, env(start))
    assert starting.phase is Phase.STARTING
    assert react(starting, ContainerExited(exit_code=0, incarnation="run-1")) == []  # the old run's exit
    (ready,) = react(starting, ContainerStarted(incarnation="run-2"))
    assert evolve(starting, env(ready)).phase is Phase.READY
    assert decide(completed, cmd(StopSandbox)) == []
    (delete,) = decide(completed, cmd(DeleteSandbox))  # type: ignore[misc]
    assert isinstance(delete, SandboxDeleteRequested)
    # a start made outside sandboxctl, a later run, is Ready
    (outside,) = react(completed, ContainerStarted(incarnation="run-2"))
    assert isinstance(outside, SandboxReady)


# -- expected versions ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [StopSandbox, StartSandbox, DeleteSandbox, TouchSandbox])
def test_a_command_for_a_sandbox_that_moved_past_its_expected_seq_is_a_conflict_naming_the_seq(
    kind: type,
) -> None:
    ready = state(Phase.READY)  # at seq 7
    refused = decide(ready, cmd(kind, expected_seq=6))
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.CONFLICT and refused.seq == 7
    assert "log seq 7, not 6" in refused.message
    assert isinstance(decide(ready, cmd(kind, expected_seq=7)), list)  # still there: decided as ever


def test_a_create_that_expects_a_fresh_name_is_refused_once_the_name_was_used() -> None:
    assert isinstance(decide(None, cmd(CreateSandbox, expected_seq=0)), list)
    refused = decide(None, cmd(CreateSandbox, expected_seq=3))
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.CONFLICT and refused.seq == 0
    deleted = msgspec.structs.replace(state(Phase.DELETED), seq=12)
    refused = decide(deleted, cmd(CreateSandbox, command_id="c-2", expected_seq=0))
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.CONFLICT and refused.seq == 12
    assert isinstance(decide(deleted, cmd(CreateSandbox, command_id="c-2", expected_seq=12)), list)
    # the retry of the create that made it is answered as ever, though the sandbox moved since
    made = msgspec.structs.replace(state(Phase.READY), sandbox_id="c-1")
    assert decide(made, cmd(CreateSandbox, expected_seq=0)) == []


# -- resources and environment ----------------------------------------------------------------


def test_resources_and_env_are_recorded_and_out_of_range_ones_never_decode() -> None:
    resources = Resources(cpus=1.5, memory=512 * 2**20, pids=256)
    (created,) = decide(None, cmd(CreateSandbox, resources=resources, env={"A": "1", "B_2": "x=y"}))  # type: ignore[misc]
    assert isinstance(created, SandboxCreated) and created.resources == resources
    assert created.env == {"A": "1", "B_2": "x=y"}
    wire = b'{"type":"sandboxctl.command.create.v1","name":"box","command_id":"c","image":"i",%s}'
    for bad in (
        b'"resources":{"cpus":0}',
        b'"resources":{"cpus":-1}',
        b'"resources":{"cpus":1e999}',
        b'"resources":{"memory":4096}',
        b'"resources":{"memory":1.5}',
        b'"resources":{"pids":0}',
        b'"resources":{"swap":1}',
        b'"env":{"1A":"x"}',
        b'"env":{"A-B":"x"}',
        b'"env":{"":"x"}',
        b'"expected_seq":-1',
        b'"expected_seq":"7"',
    ):
        with pytest.raises(msgspec.ValidationError):
            command_decoder.decode(wire % bad)
    nul = decide(None, cmd(CreateSandbox, env={"A": "x\x00y"}))
    assert isinstance(nul, Rejection) and nul.code is ErrorCode.INVALID_ARGUMENT and "NUL" in nul.message


def test_a_vm_sandbox_asked_to_boot_in_less_memory_than_its_guest_needs_is_refused_before_it_is_logged() -> None:
    drivers = ("podman", "vm")
    small = Resources(memory=VM_MEMORY_MIN - 2**20)
    refused = decide(None, cmd(CreateSandbox, driver="vm", resources=small), drivers)
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.INVALID_ARGUMENT
    assert f"below the {VM_MEMORY_MIN >> 20} MiB" in refused.message
    (made,) = decide(None, cmd(CreateSandbox, driver="vm", resources=Resources(memory=VM_MEMORY_MIN)), drivers)  # type: ignore[misc]
    assert isinstance(made, SandboxCreated)
    (container,) = decide(None, cmd(CreateSandbox, driver="podman", resources=small), drivers)  # type: ignore[misc]
    assert isinstance(container, SandboxCreated)  # a container needs no kernel of its own
    stopped = msgspec.structs.replace(state(Phase.STOPPED), driver="vm")
    shrunk = decide(stopped, cmd(UpdateSandbox, resources=small), drivers)
    assert isinstance(shrunk, Rejection) and shrunk.code is ErrorCode.INVALID_ARGUMENT
    # Its workspace is a disk inside the guest: no archive of it yet, asked for or automatic.
    refused = decide(stopped, cmd(ArchiveSandbox), drivers)
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.FAILED_PRECONDITION and "vm" in refused.message
    refused = decide(None, cmd(CreateSandbox, driver="vm", auto_archive_after=60.0), drivers)
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.INVALID_ARGUMENT


# -- update ------------------------------------------------------------------------------------


def test_update_records_only_what_changes_and_resources_only_while_nothing_runs() -> None:
    made = msgspec.structs.replace(
        state(Phase.READY), labels={"team": "red", "keep": "y"}, resources=Resources(memory=64 * 2**20, pids=64)
    )
    (updated,) = decide(made, cmd(UpdateSandbox, labels={"tier": "a"}, remove_labels=["team"], idle_timeout=60.0))  # type: ignore[misc]
    assert updated == SandboxUpdated(labels={"keep": "y", "tier": "a"}, idle_timeout=60.0)
    after = evolve(made, env(updated))
    assert after.phase is Phase.READY and after.labels == {"keep": "y", "tier": "a"} and after.idle_timeout == 60
    assert decide(after, cmd(UpdateSandbox, labels={"tier": "a"})) == []  # nothing changes: nothing recorded
    refused = decide(made, cmd(UpdateSandbox, resources=Resources(cpus=1.0)))
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.FAILED_PRECONDITION
    assert "stop it first" in refused.message
    for phase in (Phase.STOPPED, Phase.COMPLETED, Phase.ERROR):
        resting = msgspec.structs.replace(made, phase=phase)
        (resized,) = decide(resting, cmd(UpdateSandbox, resources=Resources(cpus=0.5)))  # type: ignore[misc]
        assert isinstance(resized, SandboxUpdated)
        assert resized.resources == Resources(cpus=0.5, memory=64 * 2**20, pids=64)  # the others stay
        resized_state = evolve(resting, env(resized))
        (start,) = decide(resized_state, cmd(StartSandbox))  # type: ignore[misc]
        assert isinstance(start, SandboxStartRequested) and start.resources == resized.resources
        assert start.remake  # the worker makes the container again, with the new limits
        starting = evolve(resized_state, env(start))
        assert starting.resized  # until the start is done: a start that failed makes it again next time
        ready = evolve(starting, env(SandboxReady(incarnation="run-2")))
        assert not ready.resized
        rested = evolve(
            evolve(ready, env(SandboxStopRequested(sandbox_id="c", driver="podman"))), env(SandboxStopped())
        )
        (again,) = decide(rested, cmd(StartSandbox))  # type: ignore[misc]
        assert isinstance(again, SandboxStartRequested) and not again.remake  # nothing to look at on the engine
        # A start made outside sandboxctl (Stopped straight to Ready) did not make it again.
        outside = evolve(resized_state, env(SandboxReady(incarnation="run-9")))
        assert outside.resized
    for bad in (
        cmd(UpdateSandbox, labels={"sandboxctl.x": "1"}),
        cmd(UpdateSandbox, labels={"a": "1"}, remove_labels=["a"]),
        cmd(UpdateSandbox, labels={f"k{i}": "v" for i in range(63)}),  # 2 + 63 > 64
    ):
        refused = decide(made, bad)
        assert isinstance(refused, Rejection) and refused.code is ErrorCode.INVALID_ARGUMENT, refused
    deleting = msgspec.structs.replace(made, phase=Phase.DELETING)
    assert isinstance(decide(deleting, cmd(UpdateSandbox, labels={"a": "1"})), Rejection)


# -- pause and resume --------------------------------------------------------------------------


def test_pause_and_resume_go_through_their_own_phases_and_a_paused_sandbox_may_stop_or_die() -> None:
    ready = state(Phase.READY)
    (pause,) = decide(ready, cmd(PauseSandbox))  # type: ignore[misc]
    assert isinstance(pause, SandboxPauseRequested)
    pausing = evolve(ready, env(pause))
    assert pausing.phase is Phase.PAUSING and decide(pausing, cmd(PauseSandbox)) == []
    # the late echo of an earlier thaw (the container runs until the pause takes) undoes nothing
    assert react(pausing, ContainerResumed(incarnation="run-1")) == []
    (paused,) = react(pausing, ContainerPaused(incarnation="run-1"))
    frozen = evolve(pausing, env(paused))
    assert frozen.phase is Phase.PAUSED
    assert react(frozen, ContainerPaused(incarnation="run-1")) == []  # a watcher's copy
    assert react(ready, ContainerPaused(incarnation="run-0")) == []  # an earlier run's
    (resume,) = decide(frozen, cmd(ResumeSandbox))  # type: ignore[misc]
    resuming = evolve(frozen, env(resume))
    assert resuming.phase is Phase.RESUMING
    (back,) = react(resuming, ContainerResumed(incarnation="run-1"))
    assert evolve(resuming, env(back)).phase is Phase.READY
    # a pause or a thaw made outside sandboxctl moves the phase the same way
    (outside,) = react(ready, ContainerPaused(incarnation="run-1"))
    assert evolve(ready, env(outside)).phase is Phase.PAUSED
    (thawed,) = react(frozen, ContainerResumed(incarnation="run-1"))
    assert evolve(frozen, env(thawed)).phase is Phase.READY
    # stop and delete fit a paused sandbox; an exit while frozen is a failure, never a job done
    (stop,) = decide(frozen, cmd(StopSandbox))  # type: ignore[misc]
    assert evolve(frozen, env(stop)).phase is Phase.STOPPING
    (killed,) = react(frozen, ContainerExited(exit_code=0, incarnation="run-1"))
    assert isinstance(killed, SandboxFailed) and evolve(frozen, env(killed)).phase is Phase.ERROR
    # what does not fit is refused, naming where it would
    for phase, command in ((Phase.STOPPED, PauseSandbox), (Phase.ERROR, PauseSandbox), (Phase.STOPPED, ResumeSandbox)):
        refused = decide(state(phase), cmd(command))
        assert isinstance(refused, Rejection) and refused.code is ErrorCode.FAILED_PRECONDITION, (phase, refused)
    assert decide(ready, cmd(ResumeSandbox)) == []  # Ready already: nothing to resume


# -- archive (the decisions; the worker's side comes with the object store) ------------------


def test_archive_is_for_a_stopped_sandbox_and_start_brings_an_archived_one_back() -> None:
    stopped = state(Phase.STOPPED)
    (request,) = decide(stopped, cmd(ArchiveSandbox))  # type: ignore[misc]
    assert isinstance(request, SandboxArchiveRequested) and request.object == "box/id-1"
    archiving = evolve(stopped, env(request))
    assert archiving.phase is Phase.ARCHIVING and decide(archiving, cmd(ArchiveSandbox)) == []
    assert react(archiving, ContainerRemoved()) == []  # the archive's own removal of the container
    (done,) = react(archiving, WorkspaceArchived(object="box/id-1", digest="SHA-256=x", size=10))
    archived = evolve(archiving, env(done))
    assert archived.phase is Phase.ARCHIVED
    assert react(archived, ContainerRemoved()) == []
    (start,) = decide(archived, cmd(StartSandbox))  # type: ignore[misc]
    restoring = evolve(archived, env(start))
    assert restoring.phase is Phase.STARTING and restoring.archive == "box/id-1"
    # a restore's removal of what an earlier one left, reported again, is not news
    assert react(restoring, ContainerRemoved()) == []
    # a plain start's container removed is
    plain = evolve(stopped, env(decide(stopped, cmd(StartSandbox))[0]))  # type: ignore[index]
    assert react(plain, ContainerRemoved()) != []
    for phase in (Phase.READY, Phase.PAUSED, Phase.ERROR, Phase.COMPLETED):
        refused = decide(state(phase), cmd(ArchiveSandbox))
        assert isinstance(refused, Rejection) and refused.code is ErrorCode.FAILED_PRECONDITION
        assert "archive is allowed in Stopped" in refused.message


def test_an_archive_done_after_its_deadline_is_still_archived_and_a_restore_gets_the_archives_time() -> None:
    from sandboxctl.statemachine.bulk import BULK_PHASES
    from sandboxctl.statemachine.deadlines import DEFAULT_DEADLINES, overdue

    archiving = evolve(state(Phase.STOPPED), env(decide(state(Phase.STOPPED), cmd(ArchiveSandbox))[0]))  # type: ignore[index]
    (timed_out,) = overdue(archiving, archiving.since + DEFAULT_DEADLINES[Phase.ARCHIVING] + 1, {})
    failed = evolve(archiving, env(timed_out))
    assert failed.phase is Phase.ERROR and failed.failed_operation == "archive"
    # the worker finishes later: its volume is gone, so the object must be named by the log
    (late,) = react(failed, WorkspaceArchived(object="box/id-1", digest="SHA-256=x", size=10))
    archived = evolve(failed, env(late))
    assert archived.phase is Phase.ARCHIVED and archived.archive == "box/id-1"
    # an Error of another operation is not turned into Archived by a stray report
    other = msgspec.structs.replace(state(Phase.ERROR), failed_operation="start")
    assert react(other, WorkspaceArchived(object="box/id-1", digest="SHA-256=x", size=10)) == []
    # a start that restores streams the archive back: it has the archive's time, not a start's
    (start,) = decide(archived, cmd(StartSandbox))  # type: ignore[misc]
    restoring = evolve(archived, env(start))
    start_limit = DEFAULT_DEADLINES[Phase.STARTING]
    assert overdue(restoring, restoring.since + start_limit + 1, {}) == []
    assert overdue(restoring, restoring.since + DEFAULT_DEADLINES[Phase.ARCHIVING] + 1, {}) != []
    plain = evolve(state(Phase.STOPPED), env(decide(state(Phase.STOPPED), cmd(StartSandbox))[0]))  # type: ignore[index]
    assert overdue(plain, plain.since + start_limit + 1, {}) != []
    assert Phase.ARCHIVED in BULK_PHASES["start"]  # start --all brings archived sandboxes back too
