"""JetStream publishes that wait for their ack on one inbox per connection.

Every append to the log, every driver fact and every dead letter is a
JetStream publish whose ack says it is stored. nats-py's ``js.publish`` makes
each one a full request (a new token, a timer per publish, the ack parsed into
a dataclass); on the state machine's hot path, two appends per command, that
costs. Here a connection gets one wildcard inbox subscription, a counter for
tokens, one future per publish, a single sweeper for timeouts and msgspec for
the ack. The semantics are
``js.publish``'s: the ack or the server's error (as nats-py's ``APIError``
family, so ``err_code`` checks keep working), ``NoStreamResponseError`` when
no stream listens, ``nats.errors.TimeoutError`` when no ack came in time.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import weakref
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from sandboxctl.bus.natsinternals import connection_of
from sandboxctl.observe import tracing

ACK_TIMEOUT = 5.0  # js.publish's default

# What a request to JetStream raises when the stream cannot be reached or cannot answer for now.
UNREACHABLE: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
# JetStream's answers when it cannot store: out of resources or storage (a full disk), not
# enabled (it disables itself after a write error). Any 5xx is the server's trouble too.
RESOURCES_EXHAUSTED = frozenset({10023, 10028, 10039, 10047, 10076, 10077})
# JetStream's answer to a publish whose Nats-Msg-Id another publish is storing at this moment.
DUPLICATE_IN_PROCESS = 10158


def cannot_store(exc: BaseException) -> bool:
    """Whether ``exc`` is the bus's trouble for now (unreachable, electing a leader, out of
    space), not the message's: what failed on it is tried again until it goes through, and
    never given up on as poison."""
    if isinstance(exc, UNREACHABLE):
        return True
    if isinstance(exc, APIError):
        return (exc.code or 0) >= 500 or exc.err_code in RESOURCES_EXHAUSTED or exc.err_code == DUPLICATE_IN_PROCESS
    return False


SWEEP_EVERY = 0.25  # how late a timeout may be noticed: one wake-up per sweep, not one timer per publish


class Ack(msgspec.Struct):
    """A JetStream pub ack, or the error the server answered with."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(Ack).decode


class _Acks:
    """The ack inbox of one connection: tokens waiting for their ack, oldest deadline first."""

    def __init__(self, nc: NATS) -> None:
        # No reference to ``nc`` here: it is this object's key in a weak dictionary.
        self.prefix = f"{nc.new_inbox()}."
        self.cut = len(self.prefix)
        self.waiting: dict[str, asyncio.Future[Msg]] = {}
        self.deadlines: list[tuple[float, str]] = []  # a heap
        self.tokens = itertools.count()
        # The inbox's tasks outlive the publish that made them: they start from an empty context,
        # not the trace that publish was part of (observe.tracing).
        loop = asyncio.get_running_loop()
        self.ready = loop.create_task(nc.subscribe(f"{self.prefix}*", cb=self._on_ack), context=contextvars.Context())
        self.sweeper: asyncio.Task[None] | None = None

    async def _on_ack(self, msg: Msg) -> None:
        future = self.waiting.pop(msg.subject[self.cut :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while self.deadlines:
            deadline, token = self.deadlines[0]
            if token in self.waiting and deadline > loop.time():
                await asyncio.sleep(SWEEP_EVERY)
                continue
            heapq.heappop(self.deadlines)
            future = self.waiting.pop(token, None)
            if future is not None and not future.done():
                future.set_exception(nats.errors.TimeoutError())

    async def publish(self, nc: NATS, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> Ack:
        if not self.ready.done():
            await asyncio.shield(self.ready)
        loop = asyncio.get_running_loop()
        token = str(next(self.tokens))
        future: asyncio.Future[Msg] = loop.create_future()
        self.waiting[token] = future
        heapq.heappush(self.deadlines, (loop.time() + timeout, token))
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = loop.create_task(self._sweep(), name="sandboxctl-ack-sweeper", context=contextvars.Context())
        try:
            await nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
            msg = await future
        finally:
            self.waiting.pop(token, None)
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise NoStreamResponseError()
        ack = _decode_ack(msg.data)
        if ack.error is not None:
            APIError.from_error(ack.error)  # raises the error's own class
        return ack


_inboxes: weakref.WeakKeyDictionary[NATS, _Acks] = weakref.WeakKeyDictionary()


async def publish(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    stream: str,
    headers: dict[str, str],
    timeout: float = ACK_TIMEOUT,
) -> Ack:
    """Publish to ``stream`` and return once the server says it is stored (or why not). The current
    trace context, if any, goes with it (observe.tracing): stored in the log, it is the next hop's."""
    nc = connection_of(js)
    acks = _inboxes.get(nc)
    if acks is None or (acks.ready.done() and acks.ready.exception() is not None):
        acks = _inboxes[nc] = _Acks(nc)  # the first, or one whose subscription failed: a fresh inbox
    sent = {**headers, "Nats-Expected-Stream": stream}
    tracing.inject(sent)
    return await acks.publish(nc, subject, payload, sent, timeout)
