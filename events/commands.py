"""Commands: what a user or another service asks sandboxctl to do.

Commands are flat JSON objects, tagged by a versioned ``type``, so a client in
any language can build one without an envelope. ``command_id`` is the
idempotency key: the state machine uses it as ``Nats-Msg-Id`` when it appends,
so a retried command never appends twice.

The annotations here are evaluated as the classes are made (no ``from __future__ import
annotations``): a decoder made from strings compiles each one, which every CLI call would pay.
"""

from typing import Annotated, ClassVar, Literal

import msgspec

from sandboxctl.events import limits
from sandboxctl.events.spec import NO_RESOURCES, Env, Resources

# Every field a client sends is bounded here (events/limits.py says why): a command outside
# these bounds is refused at decoding with invalid_argument, and the AsyncAPI document states them.
Name = Annotated[str, msgspec.Meta(max_length=limits.NAME_MAX)]
CommandId = Annotated[
    str,
    msgspec.Meta(
        max_length=limits.COMMAND_ID_MAX,
        pattern=limits.COMMAND_ID_PATTERN,
        description="The idempotency key: the same id with the same command is applied once; "
        "with another command it is refused.",
    ),
]
Actor = Annotated[str, msgspec.Meta(max_length=limits.ACTOR_MAX)]
CorrelationId = Annotated[str, msgspec.Meta(max_length=limits.CORRELATION_ID_MAX)]
Image = Annotated[str, msgspec.Meta(max_length=limits.IMAGE_MAX)]
Argument = Annotated[str, msgspec.Meta(max_length=limits.COMMAND_ARG_MAX)]
Arguments = Annotated[list[Argument], msgspec.Meta(max_length=limits.COMMAND_ARGS_MAX)]
LabelKey = Annotated[str, msgspec.Meta(max_length=limits.LABEL_KEY_MAX, pattern=limits.LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, msgspec.Meta(max_length=limits.LABEL_VALUE_MAX)]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=limits.LABELS_MAX)]
Driver = Annotated[str, msgspec.Meta(max_length=limits.DRIVER_MAX)]
HostName = Annotated[str, msgspec.Meta(max_length=limits.HOST_MAX, pattern=limits.HOST_PATTERN)]
Constraints = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=limits.CONSTRAINTS_MAX)]
Reason = Annotated[str, msgspec.Meta(max_length=limits.REASON_MAX)]
Holder = Annotated[str, msgspec.Meta(max_length=limits.HOLDER_MAX)]
Grace = Annotated[float, msgspec.Meta(ge=0, le=limits.GRACE_MAX)]
Ttl = Annotated[float, msgspec.Meta(gt=0, le=limits.TTL_MAX)]
Idle = Annotated[float, msgspec.Meta(ge=0, le=limits.IDLE_MAX)]
IdleAction = Literal["stop", "pause"]
ExpectedSeq = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=limits.SEQ_MAX,
        description="Act only if the sandbox is still at this log sequence (its last_seq; 0: the name "
        "was never used): a sandbox that has moved is answered conflict with its current seq, and "
        "nothing is appended.",
    ),
]


class _Command(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    name: Name
    command_id: CommandId
    actor: Actor = "anonymous"
    correlation_id: CorrelationId = ""
    expected_seq: ExpectedSeq | None = None
    VERB: ClassVar[str] = ""


class CreateSandbox(_Command, tag="sandboxctl.command.create.v1"):
    image: Image
    command: Arguments | None = None
    labels: Labels = {}
    driver: Driver = ""
    # Seconds of idleness after which the reaper stops (never deletes) the sandbox; 0 disables,
    # absent takes the state machine's configured default (SANDBOXCTL_IDLE_TIMEOUT).
    idle_timeout: Idle | None = None
    # Seconds a Stopped sandbox may stay Stopped before the reaper deletes it, workspace and all.
    # Opt-in only: 0, the default, never deletes.
    auto_delete_after: Idle = 0.0
    resources: Resources = NO_RESOURCES
    env: Env = {}
    # What the reaper does to it once idle past idle_timeout: stop it, or pause it (memory kept).
    idle_action: IdleAction = "stop"
    # Seconds a Stopped sandbox may stay Stopped before the reaper archives its workspace into the
    # object store (phase Archived; a start restores it). 0, the default: never.
    auto_archive_after: Idle = 0.0
    # Where it may run: on this host only (""; any), and on a host whose labels carry each pair.
    host: HostName = ""
    constraints: Constraints = {}
    VERB: ClassVar[str] = "create"


class CloneSandbox(_Command, tag="sandboxctl.command.clone.v1"):
    """Create sandbox ``name`` with a copy of sandbox ``source``'s workspace, and its image, command,
    resources, env, labels and idle settings; each field given here overrides the source's (labels
    and env are merged over its, resources limit by limit). The source may be Stopped, Paused or
    Ready; a Ready one is paused for the copy and resumed (the created event says so)."""

    source: Name
    image: Image = ""
    command: Arguments | None = None
    labels: Labels = {}
    env: Env = {}
    resources: Resources = NO_RESOURCES
    idle_timeout: Idle | None = None
    idle_action: IdleAction | None = None
    VERB: ClassVar[str] = "clone"


class StopSandbox(_Command, tag="sandboxctl.command.stop.v1"):
    """Stop the sandbox, keeping its workspace: SIGTERM, then SIGKILL after ``timeout`` seconds. A stop
    while Stopping with a grace that ends sooner than the pending one shortens the wait."""

    timeout: Grace = 10.0
    # Why, recorded in the log (``idle`` for the reaper's stops, which the decider checks
    # against the warning it gave; anything else is free text).
    reason: Reason = ""
    VERB: ClassVar[str] = "stop"


class StartSandbox(_Command, tag="sandboxctl.command.start.v1"):
    VERB: ClassVar[str] = "start"


class DeleteSandbox(_Command, tag="sandboxctl.command.delete.v1"):
    reason: Reason = ""  # ``auto_delete`` for the reaper's opt-in deletes, checked like an idle stop
    VERB: ClassVar[str] = "delete"


class PauseSandbox(_Command, tag="sandboxctl.command.pause.v1"):
    """Freeze the sandbox's processes: the engine keeps their memory and frees the CPU. ``resume``
    thaws them where they were; ``stop`` of a paused sandbox thaws it to stop it."""

    reason: Reason = ""  # ``idle`` for the reaper's pauses (a sandbox created with idle_action pause)
    VERB: ClassVar[str] = "pause"


class ArchiveSandbox(_Command, tag="sandboxctl.command.archive.v1"):
    """Move a Stopped sandbox's workspace into the object store and free its volume and container
    (phase Archived); ``start`` restores it first. The volume is removed only once the stored
    object is complete and its digest checked."""

    reason: Reason = ""  # ``auto_archive`` for the reaper's (a sandbox created with auto_archive_after)
    VERB: ClassVar[str] = "archive"


class ResumeSandbox(_Command, tag="sandboxctl.command.resume.v1"):
    VERB: ClassVar[str] = "resume"


class UpdateSandbox(_Command, tag="sandboxctl.command.update.v1"):
    """Change a sandbox: each field given replaces what it had. ``resources`` names the limits to
    change (the others stay), and only while nothing runs (Stopped, Completed or Error): the
    next start makes the container again with them, on the same workspace. ``labels`` are set
    (added or replaced), ``remove_labels`` removed; ``idle_timeout`` (0: never) takes effect at
    once. An update that changes nothing appends nothing."""

    resources: Resources = NO_RESOURCES
    labels: Labels = {}
    remove_labels: Annotated[list[LabelKey], msgspec.Meta(max_length=limits.LABELS_MAX)] = []
    idle_timeout: Idle | None = None
    idle_action: IdleAction | None = None
    VERB: ClassVar[str] = "update"


# Activity, leases and holds: they record facts about use, never move the phase.


class TouchSandbox(_Command, tag="sandboxctl.command.touch.v1"):
    """Someone is using the sandbox: its idle clock starts again."""

    via: Annotated[str, msgspec.Meta(max_length=limits.VIA_MAX)] = "touch"  # ``touch``, ``exec``, ``shell``
    VERB: ClassVar[str] = "touch"


class AcquireLease(_Command, tag="sandboxctl.command.lease_acquire.v1"):
    """Keep the sandbox from being auto-stopped for ``ttl`` seconds; acquiring again extends it."""

    holder: Holder
    ttl: Ttl
    VERB: ClassVar[str] = "lease_acquire"


class RenewLease(_Command, tag="sandboxctl.command.lease_renew.v1"):
    """Extend a live lease by ``ttl`` seconds from now; an expired one must be acquired again."""

    holder: Holder
    ttl: Ttl
    VERB: ClassVar[str] = "lease_renew"


class ReleaseLease(_Command, tag="sandboxctl.command.lease_release.v1"):
    holder: Holder
    VERB: ClassVar[str] = "lease_release"


class PlaceStopHold(_Command, tag="sandboxctl.command.hold.v1"):
    """Keep the sandbox from starting until the holder releases the hold."""

    holder: Holder
    reason: Reason = ""
    VERB: ClassVar[str] = "hold"


class ReleaseStopHold(_Command, tag="sandboxctl.command.unhold.v1"):
    holder: Holder
    VERB: ClassVar[str] = "unhold"


class RecordCopy(_Command, tag="sandboxctl.command.copy.v1"):
    """Record a copy made through the engine's archive API (``sandboxctl cp``): files put into the
    sandbox (``in``) or taken out of it (``out``) at ``path``, an archive of ``size`` bytes. The
    copy is done when this is sent; the log keeps what was copied, and by whom. It is use."""

    direction: Literal["in", "out"]
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=limits.PATH_MAX)]
    size: Annotated[int, msgspec.Meta(ge=0, le=limits.SEQ_MAX)]
    VERB: ClassVar[str] = "copy"


class WarnSandbox(_Command, tag="sandboxctl.command.warn.v1"):
    """The reaper's notice that a deadline passed: the sandbox is stopped (``kind`` ``stop``) or,
    opted in, archived (``archive``) or deleted (``delete``) after ``grace`` seconds unless
    activity or a lease comes first.
    ``activity_seq`` names the deadline: the log sequence of the activity it counts from."""

    kind: Annotated[str, msgspec.Meta(max_length=limits.KIND_MAX)]
    activity_seq: Annotated[int, msgspec.Meta(ge=0, le=limits.SEQ_MAX)]
    grace: Annotated[float, msgspec.Meta(ge=0, le=limits.TTL_MAX)]
    VERB: ClassVar[str] = "warn"


BulkVerb = Literal["stop", "start", "pause", "resume", "archive", "delete"]


class BulkSandboxes(
    msgspec.Struct, kw_only=True, tag_field="type", tag="sandboxctl.command.bulk.v1", omit_defaults=True
):
    """One command for many sandboxes: ``verb`` for every sandbox whose labels carry each pair of
    ``selector``, or with ``all`` every sandbox, among those in a phase the verb is for (stop:
    Ready or Paused; start: Stopped or Error; pause: Ready; resume: Paused; delete: any). Exactly
    one of ``selector`` and ``all``; with ``host``, only sandboxes placed there. The state machine
    fans it out as one command per sandbox, decided and logged as if sent alone, each caused by
    this one (``correlationid``: this ``command_id``) under an id derived from this ``command_id``
    and the name, so a retry acts on no sandbox twice. It answers a page at a time, in name order:
    ``after`` is the ``next`` of the page before (BulkPage)."""

    command_id: CommandId
    actor: Actor = "anonymous"
    correlation_id: CorrelationId = ""
    verb: BulkVerb
    selector: Labels = {}
    all: bool = False
    host: HostName = ""  # only the sandboxes placed on this host
    timeout: Grace = 10.0  # a stop's grace
    reason: Reason = ""
    after: Annotated[str, msgspec.Meta(max_length=limits.NAME_MAX)] = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=limits.BULK_PAGE_MAX)] = limits.BULK_PAGE_DEFAULT
    VERB: ClassVar[str] = "bulk"
    name: ClassVar[str] = ""  # names no one sandbox (an audit record of a refusal names none)


class BulkItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One sandbox's outcome in a bulk command: as a command sent alone would be answered."""

    name: str
    accepted: bool
    phase: str = ""
    seq: int = 0
    appended: int = 0
    code: str = ""  # the error's code when not accepted
    message: str = ""


class BulkPage(msgspec.Struct, kw_only=True):
    items: list[BulkItem]
    next: str = ""  # the ``after`` of the next page; "" when this was the last


bulk_decoder = msgspec.json.Decoder(BulkSandboxes)


SandboxCommand = (
    CreateSandbox
    | CloneSandbox
    | StopSandbox
    | StartSandbox
    | DeleteSandbox
    | PauseSandbox
    | ResumeSandbox
    | ArchiveSandbox
    | UpdateSandbox
    | TouchSandbox
    | AcquireLease
    | RenewLease
    | ReleaseLease
    | PlaceStopHold
    | ReleaseStopHold
    | RecordCopy
    | WarnSandbox
)
COMMAND_TYPES: tuple[type[_Command], ...] = (
    CreateSandbox,
    CloneSandbox,
    StopSandbox,
    StartSandbox,
    DeleteSandbox,
    PauseSandbox,
    ResumeSandbox,
    ArchiveSandbox,
    UpdateSandbox,
    TouchSandbox,
    AcquireLease,
    RenewLease,
    ReleaseLease,
    PlaceStopHold,
    ReleaseStopHold,
    RecordCopy,
    WarnSandbox,
)
# Commands that record use and never change the phase.
ACTIVITY_COMMANDS = (
    TouchSandbox,
    AcquireLease,
    RenewLease,
    ReleaseLease,
    PlaceStopHold,
    ReleaseStopHold,
    RecordCopy,
)
command_decoder = msgspec.json.Decoder(SandboxCommand)
