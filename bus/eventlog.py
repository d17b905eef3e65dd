"""The JetStream log: stream definitions and the one guarded append.

Every lifecycle event is appended through ``append`` with ``Nats-Msg-Id`` (so a
retried command or fact is stored once) and
``Nats-Expected-Last-Subject-Sequence`` (so two writers that decided from the
same state cannot both win). The log stream denies deletes and purges: it is
the source of truth, and projections are rebuilt from it.
"""

from __future__ import annotations

import logging

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from sandboxctl.bus.publish import ACK_TIMEOUT, Ack, publish
from sandboxctl.bus.tail import stream_seq
from sandboxctl.events import subjects
from sandboxctl.events.deadletter import DeadLettered
from sandboxctl.events.envelope import Envelope, decode_envelope, encode, now
from sandboxctl.events.facts import FACT_TYPES
from sandboxctl.events.lifecycle import EVENT_TYPES
from sandboxctl.statemachine import IllegalTransition, SandboxState, evolve
from sandboxctl.statemachine.decider import skip

log = logging.getLogger(__name__)

# JetStream's refusal of an append whose Nats-Expected-Last-Subject-Sequence is not the subject's
# last: 10071 from a single server ("wrong last sequence: N"), 10164 from a replicated stream's
# leader ("wrong last sequence").
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})


class SequenceConflict(Exception):
    """Someone else appended to the sandbox's subject since we read it: the append's guard
    (Nats-Expected-Last-Subject-Sequence) refused it."""


# The waits between a message's failures before it is dead-lettered (after MAX_DELIVER of them).
RETRY_DELAYS = (0.2, 1.0, 2.0, 5.0)


def retry_delay(deliveries: int) -> float:
    return RETRY_DELAYS[min(max(deliveries, 1), len(RETRY_DELAYS)) - 1]


class Failures:
    """How many times each message has failed by itself in this process, by stream sequence.

    A message is dead-lettered after MAX_DELIVER failures of its own, not deliveries: the
    deliveries also count every redelivery a bus that could not store caused (an outage, a full
    disk), so after a long outage a message's first failure of its own would be its last. A
    process that starts anew counts from nothing, which only gives a message more tries.
    Bounded: the oldest counts are forgotten first."""

    def __init__(self, limit: int = 10_000) -> None:
        self._counts: dict[int, int] = {}
        self._limit = limit

    def failed(self, msg: Msg) -> int:
        """Count one more failure of ``msg``; how many it has had."""
        seq = stream_seq(msg)
        count = self._counts.pop(seq, 0) + 1
        self._counts[seq] = count  # newest last
        while len(self._counts) > self._limit:
            del self._counts[next(iter(self._counts))]
        return count

    def forget(self, msg: Msg) -> None:
        """``msg`` is done with (acknowledged or dead-lettered)."""
        self._counts.pop(stream_seq(msg), None)


async def dead_letter(
    js: JetStreamContext, consumer: str, msg: Msg, reason: str, terminate: bool = True, about: str = ""
) -> None:
    """Record ``msg`` as given up on by ``consumer``, then terminate its delivery (unless
    ``terminate`` is False: the webhooks' relay gives up on one webhook of a message, not on the
    message). ``about`` tells apart records of one message for several such parts."""
    meta = msg.metadata
    record = DeadLettered(
        consumer=consumer,
        subject=msg.subject,
        stream=meta.stream,
        stream_seq=meta.sequence.stream,
        deliveries=meta.num_delivered,
        reason=reason[:2000],
        payload=msg.data[:4096].decode("utf-8", "replace"),
        time=now().isoformat(),
    )
    await publish(
        js,
        subjects.deadletter(consumer, subjects.name_of(msg.subject)),
        msgspec.json.encode(record),
        subjects.DEADLETTER_STREAM,
        {"Nats-Msg-Id": f"{consumer}:{meta.stream}:{meta.sequence.stream}" + (f":{about}" if about else "")},
    )
    if terminate:
        await msg.term()


async def append(js: JetStreamContext, envelope: Envelope, expected_seq: int, timeout: float = ACK_TIMEOUT) -> Ack:
    headers = {"Nats-Msg-Id": envelope.id, "Nats-Expected-Last-Subject-Sequence": str(expected_seq)}
    try:
        return await publish(
            js, subjects.log(envelope.subject), encode(envelope), subjects.LOG_STREAM, headers, timeout=timeout
        )
    except APIError as exc:
        if exc.err_code in WRONG_LAST_SEQUENCE:
            raise SequenceConflict(str(exc)) from exc
        raise


async def publish_fact(js: JetStreamContext, envelope: Envelope, host: str = "") -> Ack:
    """Report a fact as the worker of ``host`` (subjects.fact)."""
    subject = subjects.fact(envelope.subject, host)
    return await publish(js, subject, encode(envelope), subjects.FACTS_STREAM, {"Nats-Msg-Id": envelope.id})


def decode_event(payload: bytes) -> Envelope:
    return decode_envelope(payload, EVENT_TYPES)


def fold_logged(
    state: SandboxState | None, name: str, data: bytes, seq: int
) -> tuple[SandboxState | None, Envelope | None, str]:
    """Fold the log entry ``data``, at stream sequence ``seq`` on sandbox ``name``'s subject.

    Returns the state after it, the entry's envelope if it could be read, and why it could not
    be folded ("" when it was). The log is append-only and anyone allowed to write it may write
    garbage, or an event that does not fit the sandbox's phase, or one that names another
    sandbox than its subject: such an entry is skipped, and skipping still moves the sandbox's
    position to ``seq``, so that the next append is guarded by the sequence the log really
    holds. Every reader (state machine, projector, reaper, worker, audit) folds through this one
    function, so each skips the same entries and folds the same states.
    """
    try:
        envelope = decode_event(data)
    except DecodeError as exc:
        return skip(state, seq), None, f"unreadable: {exc}"
    if envelope.subject != name:
        return skip(state, seq), envelope, f"names sandbox {envelope.subject[:80]!r} on the subject of {name}"
    try:
        return evolve(state, envelope, seq), envelope, ""
    except IllegalTransition as exc:
        return skip(state, seq), envelope, str(exc)


def decode_fact(payload: bytes) -> Envelope:
    return decode_envelope(payload, FACT_TYPES)


async def last_subject_seq(js: JetStreamContext, name: str) -> int:
    try:
        msg = await js.get_last_msg(subjects.LOG_STREAM, subjects.log(name))
    except NotFoundError:
        return 0
    return int(msg.seq or 0)


DecodeError = (msgspec.DecodeError, msgspec.ValidationError, ValueError)
