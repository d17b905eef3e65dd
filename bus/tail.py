"""Read a stream in order from a given sequence, and keep reading as it grows.

Every reader of the log (the state machine's cache, the projector, the CLI's
``events``) needs the same thing: each message exactly once, in order, with no
gap, across reconnects and server restarts. nats-py's ordered consumer does not
reset on missed heartbeats (nats.py #510), so this is an ordered reader of our
own: an ephemeral push consumer with no acks, whose delivery sequence is
checked for gaps; on a gap, an error or silent heartbeats it is recreated from
the last stream sequence seen. Durable consumers are read by bus/pull.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from sandboxctl.bus.natsinternals import connection_of
from sandboxctl.bus.streams import push_consumer

log = logging.getLogger(__name__)


def reraise_if_cancelling() -> None:
    """Call in a loop's error handler, and at the top of every loop that runs until its task is
    cancelled: nats-py sometimes reports a cancellation as one of its own errors, and Python
    3.11's ``wait_for`` (nats-py's requests use it) returns a result that came in the same turn
    as the cancellation and swallows it. A loop that carries on after either can never be
    stopped."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_for_delivery(ready: asyncio.Event, timeout: float) -> None:
    """Wait until a delivery callback sets ``ready``, or ``timeout`` passes: an idle round."""
    ready.clear()
    try:
        await asyncio.wait_for(ready.wait(), timeout)
    except TimeoutError:
        pass
    # Python 3.11's wait_for returns the result when a cancellation comes just as the wait
    # ends, swallowing it: a reader loop would then never stop (more often the more often its
    # deliveries come, as a pinned reader's frequent heartbeats do).
    reraise_if_cancelling()


async def unsubscribe(sub: Any) -> None:
    try:
        await sub.unsubscribe()
    except Exception:  # the connection may already be gone
        pass


def sequences(reply: str) -> tuple[int, int]:
    """The stream sequence and the consumer sequence in a JetStream delivery's reply subject,
    in either of its formats ($JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.
    <pending>, and the newer one with domain and account hash tokens first and a random
    token last). nats-py's ``msg.metadata`` reads the same, plus a datetime and two objects
    per message: a twentieth of a busy log reader's CPU."""
    tokens = reply.split(".")
    return (int(tokens[5]), int(tokens[6])) if len(tokens) == 9 else (int(tokens[7]), int(tokens[8]))


def stream_seq(msg: Msg) -> int:
    """Where a message delivered by a consumer sits in its stream."""
    return sequences(msg.reply)[0]


def deliveries(msg: Msg) -> int:
    """How many times a consumer has delivered this message, this time included: the
    token before the stream sequence in either reply format (see ``sequences``)."""
    tokens = msg.reply.split(".")
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


def flow_control_reply(msg: Msg) -> str:
    """Where to answer a status message without data: a flow-control request's reply
    subject, or a heartbeat's stalled-consumer subject ("" for a plain heartbeat)."""
    return msg.reply or (msg.headers or {}).get("Nats-Consumer-Stalled", "")


class Tail:
    """A push consumer delivering to a callback, with flow control and heartbeats.

    Push delivery costs one callback per message, where nats-py's pull
    ``fetch`` creates a task and a timer per message; and the server keeps
    delivering while the caller is busy with the previous batch, so reading
    overlaps with processing. Flow-control requests are answered only once the
    caller has taken what was buffered, which is the backpressure. A stream of
    heartbeats that stops (a server restart loses the consumer) makes the
    reader reopen at the next sequence it expects.
    """

    HEARTBEAT = 1.0

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        filter_subject: str,
        start_seq: int = 1,
        batch: int = 1000,
        idle_timeout: float = 1.0,
    ) -> None:
        self._js = js
        self._nc = connection_of(js)
        self._stream = stream
        self._filter = filter_subject
        self.next_seq = max(1, start_seq)  # next stream sequence we expect to read
        self._batch = batch
        self._idle = idle_timeout
        self._sub: Any = None
        self._consumer = ""
        self._consumer_seq = 0
        self._buffer: list[Msg] = []
        self._ready = asyncio.Event()
        self._flow: list[str] = []  # flow-control replies owed once the buffer is taken
        self._heard = 0.0

    async def _deliver(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        if headers and headers.get("Status") == "100" and not msg.data:
            reply = flow_control_reply(msg)
            if reply:
                if self._buffer:
                    self._flow.append(reply)
                else:
                    await self._nc.publish(reply, b"")
            return
        self._buffer.append(msg)
        self._ready.set()

    async def _open(self) -> None:
        await self.close()
        inbox = self._nc.new_inbox()
        self._buffer, self._flow = [], []
        self._ready.clear()
        self._sub = await self._nc.subscribe(inbox, cb=self._deliver, pending_msgs_limit=-1, pending_bytes_limit=-1)
        config = push_consumer(self._filter, self.next_seq, inbox, self.HEARTBEAT)
        info = await self._js.add_consumer(self._stream, config=config)
        self._consumer = info.name
        self._consumer_seq = 0
        self._heard = time.monotonic()

    async def last_seq(self) -> int:
        """The last sequence this reader will see as of now: read up to it and you are caught up."""
        if "*" not in self._filter and ">" not in self._filter:
            try:
                msg = await self._js.get_last_msg(self._stream, self._filter)
            except NotFoundError:
                return 0
            return int(msg.seq or 0)
        info = await self._js.stream_info(self._stream)
        return int(info.state.last_seq)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        await unsubscribe(sub)
        try:
            await self._js.delete_consumer(self._stream, self._consumer)
        except Exception:
            pass

    async def _take(self) -> list[Msg]:
        if not self._buffer:
            await wait_for_delivery(self._ready, self._idle)
            if not self._buffer:
                return []
        taken, self._buffer = self._buffer[: self._batch], self._buffer[self._batch :]
        if not self._buffer:
            owed, self._flow = self._flow, []
            for reply in owed:
                await self._nc.publish(reply, b"")
        return taken

    async def batches(self) -> AsyncIterator[list[Msg]]:
        """Yield lists of messages in stream order; an empty list means idle."""
        reopen = False
        while True:
            reraise_if_cancelling()
            try:
                if self._sub is None or reopen:
                    reopen = False
                    await self._open()
                msgs = await self._take()
                if not msgs:
                    if time.monotonic() - self._heard > 3 * self.HEARTBEAT + self._idle:
                        log.info("tail %s: no heartbeat, reopening at %s", self._filter, self.next_seq)
                        reopen = True
                    yield []
                    continue
                good: list[Msg] = []
                for msg in msgs:
                    sseq, cseq = sequences(msg.reply)
                    if cseq != self._consumer_seq + 1 or sseq < self.next_seq:
                        log.info("tail %s: gap at consumer seq %s, reopening", self._filter, cseq)
                        reopen = True
                        break
                    self._consumer_seq = cseq
                    self.next_seq = sseq + 1
                    good.append(msg)
                if good:
                    yield good
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnects, server restarts, no responders
                reraise_if_cancelling()
                log.info("tail %s: %r, reopening at %s", self._filter, exc, self.next_seq)
                reopen = True
                await asyncio.sleep(0.25)
