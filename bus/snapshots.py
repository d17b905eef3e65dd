"""The state machine's snapshots: every sandbox's folded state at one log position, kept as one
object of the JetStream object store bucket ``sandboxctl-snapshots`` (replicated like the log),
so that an instance that starts or takes over reads the snapshot and folds only what the log
holds after it, however long the log has grown. The projectors keep theirs in a bucket of their
own, ``sandboxctl-projections``: their SQLite database as it stood at one position, for a replica
that starts with an empty one.

A snapshot is only ever a shortcut through the log, never a second source of truth: one that
cannot be read, was written by code that folds into another shape of state (its schema digest
differs), belongs to an earlier log (the stream's creation time differs), or names a position
the log does not hold with the subject it recorded, is ignored, and the log is folded from its
start. It is written by one instance at a time, in the background (encoded in a thread from a
copy of the states, which are immutable), and never blocks a command.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from sandboxctl.bus.lease import Lease
from sandboxctl.bus.streams import object_bucket
from sandboxctl.bus.tail import reraise_if_cancelling
from sandboxctl.events import subjects
from sandboxctl.statemachine import SandboxState

log = logging.getLogger(__name__)

FORMAT = 1
OBJECT = "statemachine"  # the object the state machine's snapshot is, replaced by each new one


class Snapshot(msgspec.Struct, kw_only=True, gc=False):
    """Every sandbox's state after the log entry at ``position`` (on ``subject``)."""

    format: int
    schema: str  # SCHEMA of the code that wrote it
    log_created: str  # the log stream's creation time, as JetStream reports it
    position: int
    subject: str  # the log subject of the entry at ``position`` ("" at 0)
    states: list[SandboxState]
    skipped: dict[str, int]  # names whose every entry was skipped, with their last position


# The shape of a folded state: a snapshot written by code whose state has another shape (a field
# added, renamed or retyped) would read back as states that code never folded, so it is not read.
SCHEMA = hashlib.sha256(msgspec.json.encode(msgspec.json.schema(SandboxState))).hexdigest()[:16]

_decoder = msgspec.msgpack.Decoder(Snapshot)


class Snapshotting(Protocol):
    """A service that keeps a snapshot of what it folded (the state machine, a projector)."""

    position: int  # the log position it has folded to
    snapshot_at: int  # the position of the last snapshot it read or wrote
    snapshot_every: int
    snapshot_check: float
    snapshot_lease: Lease

    async def write_snapshot(self) -> int: ...


async def keep_writing(service: Snapshotting, who: str, ready: Callable[[], bool] = lambda: True) -> None:
    """Have ``service`` write a snapshot once the log has grown ``snapshot_every`` entries past its
    last, one writer at a time (the holder of its lease), until cancelled. A write that fails is
    tried again at the next look; the service goes on meanwhile."""
    while True:
        reraise_if_cancelling()
        await asyncio.sleep(service.snapshot_check)
        if service.position - service.snapshot_at < service.snapshot_every or not ready():
            continue
        try:
            if not await service.snapshot_lease.hold():
                continue
            await service.write_snapshot()
        except Exception as exc:
            reraise_if_cancelling()
            log.warning("%s: snapshot at seq %d not written: %r", who, service.position, exc)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return msgspec.msgpack.encode(snapshot)


def decode_snapshot(data: bytes) -> Snapshot:
    return _decoder.decode(data)


async def snapshot_store(js: JetStreamContext, replicas: int | None = None) -> ObjectStore:
    """The snapshots' bucket, made if missing (replicas as the streams: 3 on a cluster, else 1)."""
    description = "sandboxctl: the state machine's snapshot of every sandbox's state"
    return await object_bucket(js, subjects.SNAPSHOTS_BUCKET, description, replicas)


async def save(store: ObjectStore, data: bytes) -> None:
    await store.put(OBJECT, data)


async def load(js: JetStreamContext, store: ObjectStore, log_created: str, log_last: int) -> Snapshot | None:
    """The snapshot, if there is one this code may fold on from, for the log created at
    ``log_created`` whose last sequence is ``log_last``; None (and why, in the log) otherwise."""
    return await _load(js, store, OBJECT, decode_snapshot, SCHEMA, "snapshot", log_created, log_last)


class _Positioned(Protocol):
    """What every snapshot says of itself: its format, the schema of what it holds, and where
    in which log it was taken."""

    @property
    def format(self) -> int: ...
    @property
    def schema(self) -> object: ...
    @property
    def log_created(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def subject(self) -> str: ...


_S = TypeVar("_S", bound=_Positioned)


async def _load(
    js: JetStreamContext,
    store: ObjectStore,
    name: str,
    decode: Callable[[bytes], _S],
    schema: object,
    label: str,
    log_created: str,
    log_last: int,
) -> _S | None:
    """The snapshot stored as ``name``, decoded, if it is of this code's ``schema`` and fits the
    log as it is; None, and why in the log, otherwise: a snapshot is only ever a shortcut."""
    try:
        data = (await store.get(name)).data or b""
    except NotFoundError:
        return None
    try:
        snapshot = decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("%s ignored: unreadable (%s); folding the log from its start", label, exc)
        return None
    if snapshot.format != FORMAT or snapshot.schema != schema:
        why = f"written by code of another shape (format {snapshot.format}, schema {snapshot.schema})"
    else:
        why = await _misfit(js, snapshot.log_created, snapshot.position, snapshot.subject, log_created, log_last)
    if why:
        log.warning("%s ignored: %s; folding the log from its start", label, why)
        return None
    return snapshot


async def _misfit(
    js: JetStreamContext, created: str, position: int, subject: str, log_created: str, log_last: int
) -> str:
    """Why a snapshot taken at ``position`` (on ``subject``) of the log created at ``created``
    does not fit the log as it is; "" when it does."""
    if created != log_created:
        return f"of another log (created {created}, this one {log_created})"
    if position > log_last:
        return f"at seq {position}, past the log's last, {log_last}"
    if position:
        try:
            entry = await js.get_msg(subjects.LOG_STREAM, position)
        except NotFoundError:
            entry = None
        if entry is None or entry.subject != subject:
            return f"the log holds no entry on {subject} at seq {position}"
    return ""


# -- the projectors' snapshots -----------------------------------------------------------------

PROJECTION = "projection"  # the object a projector's snapshot is, replaced by each new one


class ProjectionSnapshot(msgspec.Struct, kw_only=True):
    """A projector's database (SQLite, whole) as it stood after the log entry at ``position``
    (on ``subject``): a projector replica that starts with an empty database takes it in and
    folds only what came after, however long the log."""

    format: int
    schema: int  # the projection's schema version (services.projection.SCHEMA_VERSION)
    log_created: str
    position: int
    subject: str
    database: bytes


_projection_decoder = msgspec.msgpack.Decoder(ProjectionSnapshot)


async def projection_store(js: JetStreamContext, replicas: int | None = None) -> ObjectStore:
    """The projectors' snapshots' bucket, made if missing (replicas as the streams)."""
    description = "sandboxctl: the projectors' snapshot of their database"
    return await object_bucket(js, subjects.PROJECTIONS_BUCKET, description, replicas)


async def save_projection(store: ObjectStore, snapshot: ProjectionSnapshot) -> None:
    await store.put(PROJECTION, msgspec.msgpack.encode(snapshot))


async def load_projection(
    js: JetStreamContext, store: ObjectStore, schema: int, log_created: str, log_last: int
) -> ProjectionSnapshot | None:
    """The projectors' snapshot, if there is one of ``schema`` that fits the log as it is; None
    (and why, in the log) otherwise."""
    return await _load(
        js, store, PROJECTION, _projection_decoder.decode, schema, "projection snapshot", log_created, log_last
    )
