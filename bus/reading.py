"""Reading the log as it stands now, then stopping: one sandbox's part or all of it, decoded,
with each sandbox's phase after each event (its history), or folded into every sandbox's state.

For readers that need the log's view at one moment rather than a live cache (those follow it
with a Tail: the state machine, the projector, the reaper): the audit tools, the query
service's history, the worker's reconciliation and its check that an order was overtaken.
Every fold goes through ``fold_logged``, so these readers skip what every reader skips.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from sandboxctl.bus.eventlog import DecodeError, decode_event, fold_logged
from sandboxctl.bus.tail import Tail, stream_seq
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.lifecycle import SandboxCreated
from sandboxctl.statemachine import SandboxState
from sandboxctl.statemachine.clone import current_spec

log = logging.getLogger(__name__)

Point = int | datetime  # a log sequence, or a moment


def before_or_at(point: Point | None, seq: int, envelope: Envelope) -> bool:
    if point is None:
        return True
    if isinstance(point, int):
        return seq <= point
    return envelope.time <= point


async def read_stream(
    js: JetStreamContext, stream: str, subject: str, start: int = 1, until_seq: int | None = None
) -> AsyncIterator[list[Msg]]:
    """A stream's messages on ``subject`` (a wildcard may stand for many), from ``start`` up to
    its last sequence as it stands now (or ``until_seq``), in batches, then stop. A stream that
    does not exist has no messages."""
    tail = Tail(js, stream, subject, start, batch=1000)
    try:
        end = await tail.last_seq()
    except NotFoundError:
        return
    if until_seq is not None:
        end = min(end, until_seq)
    if end < start:
        return
    try:
        async for batch in tail.batches():
            kept = [m for m in batch if stream_seq(m) <= end]
            if kept:
                yield kept
            if tail.next_seq > end:
                return
    finally:
        await tail.close()


def read_log(
    js: JetStreamContext, name: str | None = None, start: int = 1, until_seq: int | None = None
) -> AsyncIterator[list[Msg]]:
    """The log (or one sandbox's part of it) as it stands now, in batches, then stop."""
    return read_stream(js, subjects.LOG_STREAM, subjects.log(name) if name else subjects.LOG_ALL, start, until_seq)


async def read_events(
    js: JetStreamContext, name: str | None = None, start: int = 1, until: Point | None = None
) -> AsyncIterator[tuple[int, Envelope | Exception, Msg]]:
    """Decoded events up to ``until``; an unreadable entry comes as its exception."""
    async for batch in read_log(js, name, start, until if isinstance(until, int) else None):
        for msg in batch:
            seq = stream_seq(msg)
            try:
                envelope = decode_event(msg.data)
            except DecodeError as exc:
                yield seq, exc, msg
                continue
            if not before_or_at(until, seq, envelope):
                return
            yield seq, envelope, msg


async def recorded_spec(js: JetStreamContext, name: str, sandbox_id: str) -> SandboxCreated | None:
    """What sandbox ``name`` (of id ``sandbox_id``) is made of now: its SandboxCreated with every
    update since, read from its log (a rare path: a clone, a container made again). An entry that
    names another sandbox than its subject is skipped, as every reader skips it."""
    envelopes = [e async for _, e, _ in read_events(js, name) if isinstance(e, Envelope) and e.subject == name]
    return current_spec(envelopes, sandbox_id)


def record(seq: int, envelope: Envelope, state: SandboxState | None) -> dict[str, Any]:
    return {
        "seq": seq,
        "time": envelope.time.isoformat(),
        "sandbox": envelope.subject,
        "type": envelope.type,
        "actor": envelope.actor,
        "correlationid": envelope.correlationid,
        "causationid": envelope.causationid,
        "id": envelope.id,
        "phase": state.phase.value if state else "",
        "data": msgspec.to_builtins(envelope.data),
    }


async def history(js: JetStreamContext, name: str, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Every event of one sandbox after log sequence ``after`` (at most ``limit`` of them), with
    the phase after it; deleted sandboxes included. The phases are folded from the sandbox's first
    event whatever ``after`` is, and reading stops once ``limit`` are found. An entry that cannot
    be folded is shown with its ``error`` and skipped as every reader skips it."""
    out: list[dict[str, Any]] = []
    state: SandboxState | None = None
    async for batch in read_log(js, name):
        for msg in batch:
            seq = stream_seq(msg)
            state, envelope, problem = fold_logged(state, name, msg.data, seq)
            if seq <= after:
                continue
            if limit is not None and len(out) >= limit:
                return out
            if envelope is None:
                out.append({"seq": seq, "sandbox": name, "type": "unreadable", "error": problem})
            elif problem:
                out.append({**record(seq, envelope, state), "sandbox": name, "error": problem})
            else:
                out.append(record(seq, envelope, state))
    return out


async def load_states(js: JetStreamContext) -> dict[str, SandboxState]:
    """Every sandbox's state, folded from the whole log as it stands now."""
    states: dict[str, SandboxState] = {}
    async for batch in read_log(js):
        for msg in batch:
            seq = stream_seq(msg)
            name = subjects.name_of(msg.subject)
            state, _, problem = fold_logged(states.get(name), name, msg.data, seq)
            if problem:
                log.debug("log seq %d of %s is skipped: %s", seq, name, problem)
            if state is not None:
                states[name] = state
    return states
