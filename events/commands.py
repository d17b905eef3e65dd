"""Commands: what a user or another service asks sandboxctl to do.

Commands are flat JSON objects, tagged by a versioned ``type``, so a client in
any language can build one without an envelope. ``command_id`` is the
idempotency key: the state machine uses it as ``Nats-Msg-Id`` when it appends,
so a retried command never appends twice.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class _Command(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    name: str
    command_id: str
    actor: str = "anonymous"
    correlation_id: str = ""
    VERB: ClassVar[str] = ""


class CreateSandbox(_Command, tag="sandboxctl.command.create.v1"):
    image: str
    command: list[str] | None = None
    labels: dict[str, str] = {}
    driver: str = ""
    # Seconds of idleness after which the reaper stops (never deletes) the sandbox; 0 disables,
    # absent takes the state machine's configured default (SANDBOXCTL_IDLE_TIMEOUT).
    idle_timeout: float | None = None
    # Seconds a Stopped sandbox may stay Stopped before the reaper deletes it, workspace and all.
    # Opt-in only: 0, the default, never deletes.
    auto_delete_after: float = 0.0
    VERB: ClassVar[str] = "create"


class StopSandbox(_Command, tag="sandboxctl.command.stop.v1"):
    timeout: float = 10.0
    # Why, recorded in the log (``idle`` for the reaper's stops, which the decider checks
    # against the warning it gave; anything else is free text).
    reason: str = ""
    VERB: ClassVar[str] = "stop"


class StartSandbox(_Command, tag="sandboxctl.command.start.v1"):
    VERB: ClassVar[str] = "start"


class DeleteSandbox(_Command, tag="sandboxctl.command.delete.v1"):
    reason: str = ""  # ``auto_delete`` for the reaper's opt-in deletes, checked like an idle stop
    VERB: ClassVar[str] = "delete"


# Activity, leases and holds: they record facts about use, never move the phase.


class TouchSandbox(_Command, tag="sandboxctl.command.touch.v1"):
    """Someone is using the sandbox: its idle clock starts again."""

    via: str = "touch"  # what the activity was: ``touch``, ``exec``, ``shell``
    VERB: ClassVar[str] = "touch"


class AcquireLease(_Command, tag="sandboxctl.command.lease_acquire.v1"):
    """Keep the sandbox from being auto-stopped for ``ttl`` seconds; acquiring again extends it."""

    holder: str
    ttl: float
    VERB: ClassVar[str] = "lease_acquire"


class RenewLease(_Command, tag="sandboxctl.command.lease_renew.v1"):
    """Extend a live lease by ``ttl`` seconds from now; an expired one must be acquired again."""

    holder: str
    ttl: float
    VERB: ClassVar[str] = "lease_renew"


class ReleaseLease(_Command, tag="sandboxctl.command.lease_release.v1"):
    holder: str
    VERB: ClassVar[str] = "lease_release"


class PlaceStopHold(_Command, tag="sandboxctl.command.hold.v1"):
    """Keep the sandbox from starting until the holder releases the hold."""

    holder: str
    reason: str = ""
    VERB: ClassVar[str] = "hold"


class ReleaseStopHold(_Command, tag="sandboxctl.command.unhold.v1"):
    holder: str
    VERB: ClassVar[str] = "unhold"


class WarnSandbox(_Command, tag="sandboxctl.command.warn.v1"):
    """The reaper's notice that a deadline passed: the sandbox is stopped (``kind`` ``stop``) or,
    opted in, deleted (``delete``) after ``grace`` seconds unless activity or a lease comes first.
    ``activity_seq`` names the deadline: the log sequence of the activity it counts from."""

    kind: str
    activity_seq: int
    grace: float
    VERB: ClassVar[str] = "warn"


SandboxCommand = (
    CreateSandbox
    | StopSandbox
    | StartSandbox
    | DeleteSandbox
    | TouchSandbox
    | AcquireLease
    | RenewLease
    | ReleaseLease
    | PlaceStopHold
    | ReleaseStopHold
    | WarnSandbox
)
COMMAND_TYPES: tuple[type[_Command], ...] = (
    CreateSandbox,
    StopSandbox,
    StartSandbox,
    DeleteSandbox,
    TouchSandbox,
    AcquireLease,
    RenewLease,
    ReleaseLease,
    PlaceStopHold,
    ReleaseStopHold,
    WarnSandbox,
)
# Commands that record use and never change the phase.
ACTIVITY_COMMANDS = (TouchSandbox, AcquireLease, RenewLease, ReleaseLease, PlaceStopHold, ReleaseStopHold)
command_decoder = msgspec.json.Decoder(SandboxCommand)
