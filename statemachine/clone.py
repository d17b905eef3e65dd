"""Clones as pure functions: what a sandbox is made of now, as its log says, and the decision to
create a new sandbox from another's.

A clone is a create whose spec is the source's (its SandboxCreated and the updates since),
overridden by the clone command, and whose workspace starts as a copy of the source's. It is
decided on the new sandbox's state, like a create, with the source's state and spec read as
they are now: every check a create makes applies, and the source must be Stopped, Paused or
Ready (the worker pauses a Ready one for the copy and resumes it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import msgspec

from sandboxctl.events.commands import CloneSandbox, CreateSandbox
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.lifecycle import SandboxCreated, SandboxUpdated
from sandboxctl.events.replies import ErrorCode
from sandboxctl.statemachine.decider import decide
from sandboxctl.statemachine.phases import Phase
from sandboxctl.statemachine.rejection import Decision, Rejection
from sandboxctl.statemachine.state import SandboxState

CLONEABLE = frozenset({Phase.STOPPED, Phase.PAUSED, Phase.READY})


def current_spec(envelopes: Iterable[Envelope], sandbox_id: str) -> SandboxCreated | None:
    """The SandboxCreated of sandbox ``sandbox_id`` with every update since folded in: what it is
    made of now. None if the log given holds no create of that id."""
    spec: SandboxCreated | None = None
    for envelope in envelopes:
        event = envelope.data
        if isinstance(event, SandboxCreated):
            spec = event if event.sandbox_id == sandbox_id else None
        elif spec is not None and isinstance(event, SandboxUpdated):
            changes = {
                field: getattr(event, field)
                for field in ("resources", "labels", "idle_timeout", "idle_action")
                if getattr(event, field) is not None
            }
            spec = msgspec.structs.replace(spec, **changes)
    return spec


def envelopes_of(entries: Iterable[object]) -> Iterator[Envelope]:
    return (entry for entry in entries if isinstance(entry, Envelope))


def decide_clone(
    state: SandboxState | None,
    source: SandboxState | None,
    spec: SandboxCreated | None,
    command: CloneSandbox,
    drivers: Iterable[str] = ("podman",),
    now: float = 0.0,
) -> Decision:
    """Create sandbox ``command.name`` as a clone of ``source`` (made of ``spec``)."""
    if command.source == command.name:
        return Rejection(ErrorCode.INVALID_ARGUMENT, f"sandbox {command.name} cannot be cloned onto itself")
    if source is None or source.phase is Phase.DELETED or spec is None:
        return Rejection(ErrorCode.NOT_FOUND, f"sandbox {command.source} not found: there is nothing to clone")
    if source.phase not in CLONEABLE:
        return Rejection(
            ErrorCode.FAILED_PRECONDITION,
            f"sandbox {command.source} is {source.phase.value}; clone is allowed from Stopped, Paused or Ready",
        )
    create = CreateSandbox(
        name=command.name,
        command_id=command.command_id,
        actor=command.actor,
        correlation_id=command.correlation_id,
        expected_seq=command.expected_seq,
        image=command.image or spec.image,
        command=command.command if command.command is not None else spec.command,
        labels={**spec.labels, **command.labels},
        driver=spec.driver,  # a workspace is copied within its engine,
        host=source.host,  # on its host
        idle_timeout=spec.idle_timeout if command.idle_timeout is None else command.idle_timeout,
        resources=spec.resources.merged(command.resources),
        env={**spec.env, **command.env},
        idle_action=command.idle_action or spec.idle_action,  # type: ignore[arg-type]
    )
    decision = decide(state, create, drivers, now)
    if isinstance(decision, Rejection) or not decision:
        return decision
    (created,) = decision
    assert isinstance(created, SandboxCreated)
    return [
        msgspec.structs.replace(
            created,
            clone_from=command.source,
            clone_from_id=source.sandbox_id,
            clone_paused=source.phase is Phase.READY,
        )
    ]
