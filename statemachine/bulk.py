"""Bulk commands as pure functions: which sandboxes one takes in, and the command each one gets.

The state machine fans a BulkSandboxes out into one command per sandbox, each decided by
``decide`` as if sent alone. The per-sandbox command id derives from the bulk command's id and
the sandbox's name, so a retried bulk command (or a page of it) acts on no sandbox twice."""

from __future__ import annotations

import hashlib

from sandboxctl.events.commands import (
    ArchiveSandbox,
    BulkSandboxes,
    DeleteSandbox,
    PauseSandbox,
    ResumeSandbox,
    SandboxCommand,
    StartSandbox,
    StopSandbox,
)
from sandboxctl.statemachine.phases import Phase
from sandboxctl.statemachine.state import SandboxState

# The phases each verb takes in: where it does something (a Completed job is left alone by a
# start of many: running every finished job again is never what "start them all" means).
BULK_PHASES: dict[str, frozenset[Phase]] = {
    "stop": frozenset({Phase.READY, Phase.PAUSED}),
    "start": frozenset({Phase.STOPPED, Phase.ARCHIVED, Phase.ERROR}),
    "pause": frozenset({Phase.READY}),
    "resume": frozenset({Phase.PAUSED}),
    "archive": frozenset({Phase.STOPPED}),
    "delete": frozenset(p for p in Phase if p is not Phase.DELETED),
}


def bulk_problem(bulk: BulkSandboxes) -> str | None:
    """Why a bulk command cannot be taken (None if it can): it names exactly one of a selector and all."""
    if bool(bulk.selector) == bulk.all:
        return "a bulk command needs a selector (labels every sandbox must carry) or all, and not both"
    return None


def selected(state: SandboxState, bulk: BulkSandboxes) -> bool:
    """Whether the bulk command takes ``state``'s sandbox in: in a phase its verb is for, on its
    host if it names one, carrying every label of its selector."""
    if state.phase not in BULK_PHASES[bulk.verb] or (bulk.host and state.host != bulk.host):
        return False
    labels = state.labels
    return all(labels.get(key) == value for key, value in bulk.selector.items())


def command_for(bulk: BulkSandboxes, name: str) -> SandboxCommand:
    """The command the bulk command gives sandbox ``name``: its verb, under an id of its own that
    derives from the bulk command's, correlated to it."""
    tag = hashlib.sha256(bulk.command_id.encode()).hexdigest()[:16]
    command_id, correlation = f"bulk-{tag}:{name}", bulk.correlation_id or bulk.command_id
    if bulk.verb == "stop":
        return StopSandbox(
            name=name,
            command_id=command_id,
            actor=bulk.actor,
            correlation_id=correlation,
            timeout=bulk.timeout,
            reason=bulk.reason,
        )
    if bulk.verb == "start":
        return StartSandbox(name=name, command_id=command_id, actor=bulk.actor, correlation_id=correlation)
    if bulk.verb == "pause":
        return PauseSandbox(
            name=name, command_id=command_id, actor=bulk.actor, correlation_id=correlation, reason=bulk.reason
        )
    if bulk.verb == "resume":
        return ResumeSandbox(name=name, command_id=command_id, actor=bulk.actor, correlation_id=correlation)
    if bulk.verb == "archive":
        return ArchiveSandbox(
            name=name, command_id=command_id, actor=bulk.actor, correlation_id=correlation, reason=bulk.reason
        )
    return DeleteSandbox(
        name=name, command_id=command_id, actor=bulk.actor, correlation_id=correlation, reason=bulk.reason
    )
