"""Read a stream in order from a given sequence, and keep reading as it grows.

Every reader of the log (the state machine's cache, the projector, the CLI's
``events``) needs the same thing: each message exactly once, in order, with no
gap, across reconnects and server restarts. nats-py's push ordered consumer
does not reset on missed heartbeats, so this is a pull-based ordered reader of
our own: an ephemeral consumer with no acks, whose delivery sequence is checked
for gaps; on a gap, an error or a vanished consumer it is recreated from the
last stream sequence seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)


def reraise_if_cancelling() -> None:
    """Call in a reader loop's error handler: nats-py sometimes reports a
    cancellation as one of its own errors, and a loop that carries on after it
    can never be stopped."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """One pull, with an idle round as an empty list.

    nats-py turns a cancelled ``fetch`` into its TimeoutError, which would make
    a reader loop swallow its own cancellation and never stop; so a timeout
    seen while the task is being cancelled is re-raised as the cancellation.
    """
    try:
        msgs = await sub.fetch(batch, timeout=timeout)
    except (TimeoutError, nats.errors.TimeoutError):
        msgs = []
    # Also after a normal return: a batch fetch may end early on the swallowed cancellation.
    reraise_if_cancelling()
    return msgs


class Tail:
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
        self._stream = stream
        self._filter = filter_subject
        self.next_seq = max(1, start_seq)  # next stream sequence we expect to read
        self._batch = batch
        self._idle = idle_timeout
        self._sub: JetStreamContext.PullSubscription | None = None
        self._consumer_seq = 0

    async def _open(self) -> None:
        await self.close()
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            filter_subject=self._filter,
            inactive_threshold=300.0,
            mem_storage=True,
            num_replicas=1,
            max_waiting=16,
        )
        info = await self._js.add_consumer(self._stream, config=config)
        self._sub = await self._js.pull_subscribe_bind(consumer=info.name, stream=self._stream)
        self._consumer_seq = 0

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
        consumer = sub._consumer
        try:
            await sub.unsubscribe()
        except Exception:  # the connection may already be gone
            pass
        try:
            await self._js.delete_consumer(self._stream, consumer)
        except Exception:
            pass

    async def batches(self) -> AsyncIterator[list[Msg]]:
        """Yield lists of messages in stream order; an empty list means idle."""
        idle_rounds = 0
        reopen = False
        while True:
            try:
                if self._sub is None or reopen:
                    reopen = False
                    await self._open()
                assert self._sub is not None
                msgs = await fetch(self._sub, self._batch, self._idle)
                if not msgs:
                    idle_rounds += 1
                    if idle_rounds % 5 == 0:
                        await self._js.consumer_info(self._stream, self._sub._consumer)
                    yield []
                    continue
                idle_rounds = 0
                good: list[Msg] = []
                for msg in msgs:
                    meta = msg.metadata
                    if meta.sequence.consumer != self._consumer_seq + 1 or meta.sequence.stream < self.next_seq:
                        log.info("tail %s: gap at consumer seq %s, reopening", self._filter, meta.sequence.consumer)
                        reopen = True
                        break
                    self._consumer_seq = meta.sequence.consumer
                    self.next_seq = meta.sequence.stream + 1
                    good.append(msg)
                if good:
                    yield good
            except asyncio.CancelledError:
                raise
            except NotFoundError:
                reraise_if_cancelling()
                log.info("tail %s: consumer gone, reopening at %s", self._filter, self.next_seq)
                reopen = True
                await asyncio.sleep(0.1)
            except Exception as exc:  # disconnects, server restarts, no responders
                reraise_if_cancelling()
                log.info("tail %s: %r, reopening at %s", self._filter, exc, self.next_seq)
                reopen = True
                await asyncio.sleep(0.25)
