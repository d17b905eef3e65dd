"""Clone decisions and what a sandbox is made of now (statemachine/clone.py)."""

from __future__ import annotations

import msgspec

from sandboxctl.events import Envelope, now
from sandboxctl.events.commands import CloneSandbox
from sandboxctl.events.envelope import type_name
from sandboxctl.events.lifecycle import SandboxCreated, SandboxUpdated
from sandboxctl.events.replies import ErrorCode
from sandboxctl.events.spec import Resources
from sandboxctl.statemachine import Phase, Rejection, SandboxState
from sandboxctl.statemachine.clone import current_spec, decide_clone

SPEC = SandboxCreated(
    sandbox_id="src-id", image="img", driver="docker", command=["sleep", "1"], labels={"team": "red"},
    env={"A": "1"}, resources=Resources(memory=64 * 2**20), idle_timeout=60.0,
)  # fmt: skip


def env(event: object) -> Envelope:
    return Envelope(id="e", type=type_name(type(event)), source="t", subject="src", time=now(), data=event)


def source(phase: Phase) -> SandboxState:
    return SandboxState(name="src", sandbox_id="src-id", phase=phase, driver="docker", seq=9)


def clone(**kw: object) -> CloneSandbox:
    return CloneSandbox(name="new", command_id="c-1", source="src", **kw)  # type: ignore[arg-type]


def test_what_a_sandbox_is_made_of_now_folds_its_updates_into_its_create() -> None:
    updated = SandboxUpdated(labels={"team": "blue"}, resources=Resources(memory=2**30, pids=64))
    spec = current_spec([env(SPEC), env(updated)], "src-id")
    assert spec is not None and spec.labels == {"team": "blue"} and spec.resources.pids == 64
    assert spec.image == "img" and spec.env == {"A": "1"}
    assert current_spec([env(SPEC)], "other-id") is None  # a create of another sandbox of that name


def test_a_clone_is_the_sources_create_overridden_and_names_its_source() -> None:
    (created,) = decide_clone(None, source(Phase.STOPPED), SPEC, clone(labels={"x": "1"}, env={"B": "2"}), ("docker",))  # type: ignore[misc]
    assert isinstance(created, SandboxCreated)
    assert (created.image, created.driver, created.command) == ("img", "docker", ["sleep", "1"])
    assert created.labels == {"team": "red", "x": "1"} and created.env == {"A": "1", "B": "2"}
    assert created.resources == SPEC.resources and created.idle_timeout == 60
    assert (created.clone_from, created.clone_from_id, created.clone_paused) == ("src", "src-id", False)
    assert created.sandbox_id == "c-1"
    (running,) = decide_clone(None, source(Phase.READY), SPEC, clone(image="other"), ("docker",))  # type: ignore[misc]
    assert isinstance(running, SandboxCreated) and running.clone_paused and running.image == "other"


def test_a_clone_that_cannot_be_made_is_refused() -> None:
    taken = SandboxState(name="new", sandbox_id="x", phase=Phase.READY, driver="docker")
    cases = [
        (taken, source(Phase.STOPPED), SPEC, clone(), ErrorCode.ALREADY_EXISTS),
        (None, None, None, clone(), ErrorCode.NOT_FOUND),
        (None, source(Phase.DELETED), SPEC, clone(), ErrorCode.NOT_FOUND),
        (None, source(Phase.COMPLETED), SPEC, clone(), ErrorCode.FAILED_PRECONDITION),
        (None, source(Phase.ERROR), SPEC, clone(), ErrorCode.FAILED_PRECONDITION),
        (None, source(Phase.STOPPED), SPEC, msgspec.structs.replace(clone(), name="src"), ErrorCode.INVALID_ARGUMENT),
        (None, source(Phase.STOPPED), SPEC, clone(env={"A": "x\x00"}), ErrorCode.INVALID_ARGUMENT),
        (None, source(Phase.STOPPED), SPEC, clone(expected_seq=3), ErrorCode.CONFLICT),
    ]
    for state, src, spec, command, code in cases:
        refused = decide_clone(state, src, spec, command, ("docker",))
        assert isinstance(refused, Rejection) and refused.code is code, (command, refused)
