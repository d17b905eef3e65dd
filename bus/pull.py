"""Read a durable pull consumer continuously: the state machine's facts, the workers' orders.

Both are work queues with explicit acks, where the log's other readers (bus/tail.py)
follow the stream without acks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from sandboxctl.bus.natsinternals import api_prefix, connection_of
from sandboxctl.bus.streams import pinned_consumer
from sandboxctl.bus.tail import reraise_if_cancelling, unsubscribe, wait_for_delivery

log = logging.getLogger(__name__)

PIN_ID = "Nats-Pin-Id"  # the header naming the pin a pinned consumer's delivery was made under


class Pull:
    """A durable pull consumer, read continuously: one long-poll request kept open.

    nats-py's ``fetch`` costs, per call, a no-wait probe with its "no messages"
    answer and then a lingering request, and per message a ``next_msg`` with a
    timer of its own. Here one request for ``batch`` messages is kept open
    (``EXPIRES`` long, with idle heartbeats), deliveries arrive at a callback,
    and the next request goes out once the last one is used up or has ended, so
    the server hands over work as soon as there is some and the reader pays
    only nats-py's own per-message cost. Acks, naks and redelivery are the
    durable's, as before. A request that goes silent (no message and no
    heartbeat for three heartbeats: a server restart) is replaced, and a
    consumer that is gone is created again.

    With a ``group``, the consumer is pinned (a JetStream priority group with the pinned-client
    policy): of all the readers asking, the server delivers to one at a time, so one reader works
    the consumer in order while the others stand by. The pinned reader keeps its pin by asking
    again (with the pin's id) well within ``pin_timeout``. A standby is pinned at once when the
    pinned reader gives up its pin (``release``), and within ``pin_timeout`` when it stops asking
    (a killed or frozen process).

    With ``keep_alive``, the messages of the batch the reader is working that it has not yet
    acknowledged or naked, and those delivered meanwhile for its next batch, are kept alive (an
    in-progress ack every third of the ack wait), so a short ack wait redelivers soon what a
    reader that died had been given, never what a live one is still working on (for up to
    MAX_BUSY: a reader busy with one batch for longer is taken to be stuck, and its messages
    are let go, as its pin is).
    """

    EXPIRES = 10.0
    HEARTBEAT = 1.0
    MAX_BUSY = 120.0  # seconds with one batch after which a pinned reader lets its pin go

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        config: ConsumerConfig,
        batch: int = 256,
        idle_timeout: float = 1.0,
        group: str = "",
        pin_timeout: float = 0.0,
        keep_alive: bool = False,
    ) -> None:
        assert config.durable_name, "a Pull reads a durable consumer"
        # Named as well as durable, as nats-py's pull_subscribe makes it: created on
        # CONSUMER.CREATE.<stream>.<name>.<filter>, the subject the services may use.
        config = dataclasses.replace(config, name=config.durable_name)
        self._js = js
        self._nc = connection_of(js)
        self._stream = stream
        self._config = config
        self._durable = config.durable_name or ""
        self._batch = batch
        self._idle = idle_timeout
        self._next = f"{api_prefix(js)}.CONSUMER.MSG.NEXT.{stream}.{config.durable_name}"
        self._sub: Any = None
        self._inbox = ""
        self._request = 0  # the open request's number: its status replies come to <inbox>.<number>
        self._want = 0  # messages the open request may still deliver; 0: none open
        self._lost = False  # the consumer is gone: create it again
        self._made = False  # this reader has made the consumer, or brought it to its configuration
        self._backoff = False  # the last request was refused, not used up or expired: wait before the next
        self._buffer: list[Msg] = []
        self._ready = asyncio.Event()
        self._heard = 0.0
        self._group = group
        self._pin_timeout = pin_timeout
        assert not group or pin_timeout > 0, "a pinned consumer needs its pin's timeout"
        # A request of the pinned reader ends, and is asked again, well within the pin's timeout.
        self._expires = min(self.EXPIRES, pin_timeout / 3) if group else self.EXPIRES
        self._heartbeat = min(self.HEARTBEAT, self._expires / 4)
        self.pin = ""  # the pin this reader holds ("": none, it stands by)
        self._busy_since = 0.0  # when the reader began working the last batch it was given (0: it is not)
        self._keep_alive = keep_alive
        self._in_hand: list[Msg] = []  # the batch the reader is working

    async def _deliver(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        status = msg.headers.get("Status") if msg.headers and not msg.data else None
        if status is None:
            if self._group:
                pin = (msg.headers or {}).get(PIN_ID, self.pin)
                if pin != self.pin:
                    log.info("pull %s: pinned (%s): this reader works the consumer now", self._durable, pin)
                self.pin = pin
            self._want -= 1  # counted against the open request, as we cannot tell which request it answers
            self._buffer.append(msg)
            self._ready.set()
            return
        if status == "100":
            return  # the open request's idle heartbeat
        if msg.subject == f"{self._inbox}.{self._request}":
            # 408: the request expired, ask again. 409: it ended (the consumer was deleted, a
            # leader changed, too many waiting); 503: no consumer or no JetStream answered it.
            # Then wait a little, and after a deletion or a 503 make sure the consumer exists
            # (one deleted while no request was open answers only with a 503).
            self._want = 0
            if status == "423":  # pinned no more: another reader took over; ask again as a standby
                log.info("pull %s: pin %s taken over; standing by", self._durable, self.pin)
                self.pin = ""
                self._ready.set()
                return
            self._backoff = status != "408"
            if status not in ("408", "409", "503"):
                log.warning("pull %s: request refused: %s %s", self._config.durable_name, status, msg.headers)
            description = (msg.headers or {}).get("Description", "")
            if status == "503" or (status == "409" and "deleted" in description.lower()):
                self._lost = True
            self._ready.set()

    async def _open(self) -> None:
        await self.close()
        # Made, or brought to this configuration if an earlier version made it otherwise, once; a
        # reopen (a disconnect, a silent request) makes it again only if it is gone: creating goes
        # through the cluster's meta leader, which may be the very thing that is away.
        if not self._made or self._lost:
            if self._group:
                await pinned_consumer(self._js, self._stream, self._config, self._group, self._pin_timeout)
            else:
                await self._js.add_consumer(self._stream, config=self._config)
            self._made = True
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*", cb=self._deliver, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        if self.pin:
            log.info("pull %s: pin %s dropped with the reopened reader; standing by", self._durable, self.pin)
        self._want, self._lost, self.pin = 0, False, ""

    async def _ask(self, batch: int = 0) -> None:
        self._request += 1
        self._want = batch or self._batch
        self._heard = time.monotonic()
        request: dict[str, object] = {
            "batch": self._want,
            "expires": int(self._expires * 1e9),
            "idle_heartbeat": int(self._heartbeat * 1e9),
        }
        if self._group:
            request["group"] = self._group
            if self.pin:
                request["id"] = self.pin
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=f"{self._inbox}.{self._request}")

    async def release(self) -> None:
        """Give up the pin this reader holds, so a standby is pinned at once rather than after the
        pin's timeout (a reader that stops for good; one that dies gives it up by timing out)."""
        pin, self.pin = self.pin, ""
        if not pin:
            return
        subject = f"{api_prefix(self._js)}.CONSUMER.UNPIN.{self._stream}.{self._durable}"
        try:
            await self._nc.request(subject, json.dumps({"group": self._group}).encode(), timeout=2)
        except Exception as exc:  # the pin times out anyway
            log.info("pull %s: could not give up pin %s: %r", self._durable, pin, exc)

    def progressed(self) -> None:
        """The reader finished one message of its batch: it is working, not stuck (MAX_BUSY counts
        from here). A reader whose every message may take long (the webhooks' relay) says so."""
        if self._busy_since:
            self._busy_since = time.monotonic()

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await unsubscribe(sub)

    async def _take(self) -> list[Msg]:
        if not self._buffer:
            await wait_for_delivery(self._ready, self._idle)
        taken, self._buffer = self._buffer, []
        return taken

    async def batches(self) -> AsyncIterator[list[Msg]]:
        """Yield the messages delivered since the last yield; an empty list means idle."""
        reopen = True
        keepers = []
        if self._group:
            keepers.append(asyncio.create_task(self._keep_pin(), name=f"pull-{self._durable}-pin"))
        if self._keep_alive:
            keepers.append(asyncio.create_task(self._keep_in_hand(), name=f"pull-{self._durable}-alive"))
        try:
            while True:
                reraise_if_cancelling()
                try:
                    if reopen or self._lost:
                        reopen = False
                        await self._open()
                    if self._want <= 0:
                        if self._backoff:
                            self._backoff = False
                            await asyncio.sleep(0.25)
                        await self._ask()
                    elif time.monotonic() - self._heard > 3 * self._heartbeat:
                        log.info("pull %s: request went silent, asking again", self._config.durable_name)
                        await self._ask()
                    taken = await self._take()
                    self._busy_since, self._in_hand = time.monotonic(), taken
                    yield taken
                    self._busy_since, self._in_hand = 0.0, []
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # disconnects, server restarts, no responders
                    reraise_if_cancelling()
                    log.info("pull %s: %r, reopening", self._config.durable_name, exc)
                    reopen = True
                    await asyncio.sleep(0.25)
        finally:
            for keeper in keepers:
                keeper.cancel()

    async def _keep_in_hand(self) -> None:
        """Keep alive what the reader was given and has not settled yet (see ``keep_alive``)."""
        every = (self._config.ack_wait or 30.0) / 3
        while True:
            await asyncio.sleep(every)
            busy_since = self._busy_since
            if not busy_since or time.monotonic() - busy_since > self.MAX_BUSY:
                continue
            for msg in self._in_hand + self._buffer:
                if msg.is_acked:  # settled, naked with a delay too (in progress would undo the delay)
                    continue
                try:
                    await msg.in_progress()
                except Exception as exc:  # it comes again after the ack wait, as it would anyway
                    reraise_if_cancelling()
                    log.debug("pull %s: could not keep %s alive: %r", self._durable, msg.subject, exc)

    async def _keep_pin(self) -> None:
        """While the pinned reader works what it was given, ask again (for one message, under the
        pin's id) whenever its request has ended or gone silent: a reader busy for longer than the
        pin's timeout (appends waiting out a log's election) would otherwise lose its pin to a
        standby, and the two would work the consumer at once, a sandbox's facts out of order. What
        comes meanwhile waits in the buffer, in order, for the next batch. A reader busy with one
        batch for longer than MAX_BUSY is taken to be stuck: it lets its pin go to a standby."""
        while True:
            await asyncio.sleep(self._expires)
            now, busy_since = time.monotonic(), self._busy_since
            if not busy_since:
                continue
            if now - busy_since > self.MAX_BUSY:
                if self.pin:
                    log.warning("pull %s: busy with one batch for %.0f s; letting pin %s go",
                                self._durable, now - busy_since, self.pin)  # fmt: skip
                    self.pin = ""
                continue
            silent = now - self._heard > 3 * self._heartbeat
            if self.pin and (self._want <= 0 or silent) and self._sub is not None:
                try:
                    await self._ask(batch=1)
                except Exception as exc:
                    reraise_if_cancelling()
                    log.debug("pull %s: could not keep pin %s: %r", self._durable, self.pin, exc)
