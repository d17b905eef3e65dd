"""Every JetStream stream and consumer sandboxctl makes, configured in one place.

The streams: the log (the source of truth: file storage, no deletes, no purges, a duplicate
window for idempotency), the facts the drivers report, the dead letters, and (with users) the
audit stream of refused attempts. The consumers: the state machine's durable pull consumer of
facts, each driver worker's durable pull consumer of the log, and the ephemeral push consumer
every ordered reader of the log uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from sandboxctl.bus.natsinternals import api_prefix, connection_of
from sandboxctl.events import subjects

log = logging.getLogger(__name__)
T = TypeVar("T")

# JetStream's answer to a create of a stream that exists already (another process was first).
STREAM_NAME_IN_USE = 10058
NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
NO_SUITABLE_PEERS = 10005  # "no suitable peers for placement": a cluster short of nodes for now
# Replicas of every stream on a cluster, unless configured (SANDBOXCTL_REPLICAS): a single server
# takes 1. Three keeps the log and its writers going through the loss of any one node.
AUTO_REPLICAS = 3
# How long a message id is remembered for deduplication (JetStream's default, two minutes).
DUPLICATE_WINDOW = 120.0
# A message is delivered this many times to a durable consumer before it is dead-lettered.
MAX_DELIVER = 5


def log_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.LOG_STREAM,
        description="sandboxctl lifecycle log (source of truth)",
        subjects=[subjects.LOG_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
    )


def facts_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.FACTS_STREAM,
        description="sandboxctl driver facts, consumed by the state machine",
        subjects=[subjects.FACTS_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * 24 * 3600.0,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas,
        allow_direct=True,
    )


def deadletter_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.DEADLETTER_STREAM,
        description="sandboxctl dead letters: messages a consumer gave up on",
        subjects=[subjects.DEADLETTER_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=30 * 24 * 3600.0,
        num_replicas=replicas,
    )


def audit_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.AUDIT_STREAM,
        description="sandboxctl denied attempts, for auditors",
        subjects=[subjects.AUDIT_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=365 * 24 * 3600.0,
        num_replicas=replicas,
        deny_delete=True,
        deny_purge=True,
    )


async def ensure_streams(
    js: JetStreamContext, replicas: int | None = None, audit: bool = False, owner: bool = False
) -> None:
    """Create the streams if missing (the audit stream too with ``audit``: only when users are
    authenticated), with ``replicas`` each; None (the default) is AUTO_REPLICAS on a cluster and
    1 on a single server, which refuses more. A stream's replica count is fixed by whoever
    creates it first, so every service asks the same way. A cluster short of nodes for the
    replicas (one down when the streams are first made) is waited for, never settled for less.

    With authorization on only the state machine may create streams; a worker or projector
    started before it (``serve --only``) waits for them, as the server drops its request. The
    ``owner`` (the state machine) also brings a stream an earlier version made to the subjects it
    has now (the facts' per-host subjects), keeping every message."""
    wanted = replicas or AUTO_REPLICAS
    configs = [log_stream_config(wanted), facts_stream_config(wanted), deadletter_stream_config(wanted)]
    for config in [*configs, *([audit_stream_config(wanted)] if audit else [])]:
        waited = asleep = False
        while True:
            try:
                found = await js.stream_info(config.name or "")
                if owner and found.config.subjects != config.subjects:
                    await js.update_stream(dataclasses.replace(found.config, subjects=config.subjects))
                    log.info("stream %s now takes %s", config.name, ", ".join(config.subjects or []))
                break
            except NotFoundError:
                pass
            except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError):
                # JetStream does not answer yet: a cluster still electing its meta leader
                if not asleep:
                    log.warning("JetStream does not answer about stream %s yet; waiting for it", config.name)
                    asleep = True
                await asyncio.sleep(0.5)
                continue
            try:
                await js.add_stream(config)
                break
            except APIError as exc:
                if exc.err_code == NOT_CLUSTERED and replicas is None and config.num_replicas != 1:
                    config = dataclasses.replace(config, num_replicas=1)  # a single server
                    continue
                if exc.err_code == NO_SUITABLE_PEERS:
                    waited = await _wait_for_peers(config.name or "", config.num_replicas or 1, waited)
                    continue
                if exc.err_code != STREAM_NAME_IN_USE:  # else another process created it first
                    raise
                break
            except (TimeoutError, nats.errors.TimeoutError):
                if not waited:
                    log.warning("cannot create stream %s here; waiting for the state machine to", config.name)
                    waited = True
                await asyncio.sleep(0.5)


async def _wait_for_peers(what: str, replicas: int, waited: bool) -> bool:
    """A cluster that cannot place ``replicas`` copies yet (its nodes still joining, or one down)
    is waited for, never settled for fewer copies than asked: said once, tried again shortly."""
    if not waited:
        log.warning("cannot place %s on %d nodes of the cluster yet; waiting for them", what, replicas)
    await asyncio.sleep(0.5)
    return True


def durable_pull(name: str, filter_subject: str, ack_wait: float, max_ack_pending: int) -> ConsumerConfig:
    """A service's durable pull consumer (services read it with bus/pull.py): every message from
    the start, acknowledged one by one, redelivered after ``ack_wait`` unless kept alive.

    The server never gives a message up on its own (no ``max_deliver``): a message that fails
    because the bus cannot store for now (bus.publish.cannot_store) comes again until it goes
    through, however long that takes, and only one that fails by itself is dead-lettered, by its
    service, after MAX_DELIVER deliveries. A server-side limit would drop both alike, leaving a
    sandbox in a transient phase with nothing on its way."""
    return ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        max_deliver=-1,
        filter_subject=filter_subject,
    )


async def pinned_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig, group: str, pin_timeout: float
) -> None:
    """Create the durable ``config``, or update it in place, as a pinned consumer: a priority
    group ``group`` whose server delivers to one reader at a time, moving the pin to another
    reader when the pinned one has not asked for ``pin_timeout`` seconds (or is gone). Updating
    keeps the durable's acknowledged position, so turning an existing consumer into a pinned one
    delivers nothing twice. nats-py's ConsumerConfig has no priority fields: the request is made
    here, on the subject nats-py's add_consumer uses."""
    body = config.as_dict() | {
        "priority_groups": [group],
        "priority_policy": "pinned_client",
        "priority_timeout": int(pin_timeout * 1e9),
    }
    subject = f"{api_prefix(js)}.CONSUMER.CREATE.{stream}.{config.durable_name}.{config.filter_subject}"
    msg = await connection_of(js).request(subject, json.dumps({"stream_name": stream, "config": body}).encode())
    answer = json.loads(msg.data)
    if "error" in answer:
        APIError.from_error(answer["error"])  # raises the error's own class


def push_consumer(
    filter_subject: str, start_seq: int, deliver_subject: str, heartbeat: float, inactive_threshold: float = 300.0
) -> ConsumerConfig:
    """An ephemeral in-memory push consumer with no acks and flow control, from ``start_seq``:
    how the log's readers read (this Tail, and the projector's catch-up reader)."""
    return ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        filter_subject=filter_subject,
        deliver_subject=deliver_subject,
        flow_control=True,
        idle_heartbeat=heartbeat,
        inactive_threshold=inactive_threshold,
        mem_storage=True,
        num_replicas=1,
    )


async def workspaces(js: JetStreamContext, replicas: int | None = None) -> ObjectStore:
    """The object store bucket archived workspaces are kept in, made if missing with ``replicas``
    (None: as ``ensure_streams`` chooses, so replicated like the log when clustered)."""
    return await object_bucket(
        js, subjects.WORKSPACES_BUCKET, "sandboxctl: archived workspaces, one object per archived sandbox", replicas
    )


async def object_bucket(js: JetStreamContext, bucket: str, description: str, replicas: int | None) -> ObjectStore:
    """The object store ``bucket``, made if missing with ``replicas`` (see make_once)."""
    try:
        return await js.object_store(bucket)
    except NotFoundError:
        pass

    def make(wanted: int) -> Awaitable[ObjectStore]:
        config = ObjectStoreConfig(bucket=bucket, description=description, storage=StorageType.FILE, replicas=wanted)
        return js.create_object_store(bucket, config=config)

    return await make_once(make, lambda: js.object_store(bucket), replicas)


async def key_value_bucket(
    js: JetStreamContext, bucket: str, description: str, replicas: int | None, ttl: float | None = None
) -> KeyValue:
    """The key-value ``bucket`` (one value per key, on file), made if missing with ``replicas``
    (see make_once) and, given one, a ``ttl`` for its entries."""
    with contextlib.suppress(BucketNotFoundError):
        return await js.key_value(bucket)

    def make(wanted: int) -> Awaitable[KeyValue]:
        config = KeyValueConfig(
            bucket=bucket, description=description, ttl=ttl, history=1, storage=StorageType.FILE, replicas=wanted
        )
        return js.create_key_value(config)

    return await make_once(make, lambda: js.key_value(bucket), replicas)


async def make_once(
    make: Callable[[int], Awaitable[T]], made: Callable[[], Awaitable[T]], replicas: int | None = None
) -> T:
    """A store JetStream keeps in a stream of its own (a bucket), made with ``replicas`` (None:
    AUTO_REPLICAS, or 1 on a single server, which refuses more), or the one another process made
    first (``made`` opens it)."""
    wanted = replicas or AUTO_REPLICAS
    waited = False
    while True:
        try:
            return await make(wanted)
        except APIError as exc:
            if exc.err_code == NOT_CLUSTERED and replicas is None and wanted != 1:
                wanted = 1  # a single server
                continue
            if exc.err_code == NO_SUITABLE_PEERS:
                waited = await _wait_for_peers("a bucket", wanted, waited)
                continue
            if exc.err_code != STREAM_NAME_IN_USE:  # else another process made it first
                raise
            return await made()


_CHUNKS = f"$O.{subjects.WORKSPACES_BUCKET}.C."  # + an object's nuid: the subject of its chunks


async def chunks_stored(js: JetStreamContext, nuid: str) -> int:
    """How many chunks of the object whose chunks are on ``nuid`` the bucket's stream holds: an
    object is whole when it holds as many as the object's metadata counts."""
    info = await js.stream_info(subjects.WORKSPACES_STREAM, subjects_filter=_CHUNKS + nuid)
    return sum((info.state.subjects or {}).values())


async def purge_orphan_chunks(js: JetStreamContext, older_than: float, now: float | None = None) -> list[str]:
    """Purge the chunks of puts that never finished (a worker killed in the middle of an archive
    leaves its chunks, and no metadata names them), once their newest chunk is older than
    ``older_than`` seconds: a put under way writes chunk after chunk, so it is never taken for
    one. Returns the nuids purged."""
    info = await js.stream_info(subjects.WORKSPACES_STREAM, subjects_filter=_CHUNKS + ">")
    chunked = {subject[len(_CHUNKS) :] for subject in info.state.subjects or {}}
    if not chunked:
        return []
    store = await js.object_store(subjects.WORKSPACES_BUCKET)
    try:
        named = {obj.nuid for obj in await store.list(ignore_deletes=True)}
    except NotFoundError:  # no object at all
        named = set()
    now = time.time() if now is None else now
    purged = []
    for nuid in sorted(chunked - named):
        last = await js.get_last_msg(subjects.WORKSPACES_STREAM, _CHUNKS + nuid)
        if last.time is not None and now - last.time.timestamp() > older_than:
            await js.purge_stream(subjects.WORKSPACES_STREAM, subject=_CHUNKS + nuid)
            purged.append(nuid)
    return purged
