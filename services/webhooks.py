"""The webhooks' relay: the log's events, POSTed to each webhook that wants them.

Consumes: the whole log, through a durable pull consumer of its own (``subjects.RELAY_CONSUMER``),
pinned, so that of several relays one delivers at a time and the others stand by. Produces:
HTTP requests, and a dead-letter record for each delivery it gives up on.

Promises:

- **Nothing lost across its own restart.** An event is acknowledged once every webhook that
  wants it has it (a 2xx answer) or has had it dead-lettered; until then the consumer keeps it,
  and a relay that restarts delivers it again. Delivery is at least once: a receiver drops a
  repeat by its ``ce-id``.
- **In order.** Events go out one at a time, in the log's order, so each sandbox's events reach a
  webhook in the order they happened (all of them do). A failing webhook is retried with backoff
  (``attempts`` tries, ``backoff`` doubling up to ``backoff_max``) and then dead-lettered; while
  it is retried, the other webhooks wait for the next event.
- **From when it was added.** A webhook gets the events after the log position it was added at.
  One the relay notices after it has passed that position is first caught up from the log, then
  marked joined, and carried by the consumer from there.
- **Signed.** Each request carries the body's HMAC-SHA256 under the webhook's secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import quote

import httpx
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from sandboxctl.bus.eventlog import DecodeError, dead_letter, decode_event
from sandboxctl.bus.pull import Pull
from sandboxctl.bus.reading import read_stream
from sandboxctl.bus.streams import durable_pull, ensure_streams
from sandboxctl.bus.tail import Tail, reraise_if_cancelling, stream_seq
from sandboxctl.bus.webhooks import KEYS, mark_joined, take, webhooks_bucket
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.webhooks import SIGNATURE_HEADER, Webhook, signature, type_matches
from sandboxctl.observe import metrics

log = logging.getLogger(__name__)

RELAY_GROUP = "webhooks"
PIN_TIMEOUT = 5.0  # seconds after which a standby relay takes over from a silent one
BATCH = 8  # events read ahead of the one being delivered
# Safe in a header value as it is (CloudEvents' HTTP binding percent-encodes everything else).
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '%"')


def cloudevent_headers(envelope: Envelope, seq: int) -> dict[str, str]:
    """The envelope as CloudEvents HTTP binary-mode headers (``ce-*``), with the log's sequence as
    the ``sequence`` extension."""
    attributes = {
        "specversion": envelope.specversion,
        "id": envelope.id,
        "source": envelope.source,
        "type": envelope.type,
        "subject": envelope.subject,
        "time": envelope.time.isoformat(),
        "sequence": str(seq),
        "actor": envelope.actor,
        "correlationid": envelope.correlationid,
        "causationid": envelope.causationid,
    }
    headers = {f"ce-{k}": quote(v, safe=_HEADER_SAFE) for k, v in attributes.items() if v}
    headers["Content-Type"] = envelope.datacontenttype
    return headers


class WebhookRelay:
    def __init__(
        self,
        nc: NATS,
        attempts: int = 6,
        backoff: float = 0.5,
        backoff_max: float = 10.0,
        timeout: float = 5.0,
        replicas: int | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.replicas = replicas
        self.hooks: dict[str, Webhook] = {}
        self.joined: set[str] = set()
        # The last log sequence handled; None while there is no webhook and so nothing to read
        # (the health report then counts no position, rather than one that never moves).
        self.position: int | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._pull: Pull | None = None
        self._session: httpx.AsyncClient | None = None

    async def start(self) -> None:
        await ensure_streams(self.js)
        self.kv = await webhooks_bucket(self.js, self.replicas)
        # No redirects followed, no proxy or netrc from the environment: a webhook is its URL.
        self._session = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, trust_env=False)
        self.tasks.append(asyncio.create_task(self._watch(), name="webhook-watch"))
        self.tasks.append(asyncio.create_task(self._run(), name="webhook-relay"))
        log.info("webhook relay ready")

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._pull is not None:
            await self._pull.release()  # a standby relay takes over at once
            await self._pull.close()
        if self._session is not None:
            await self._session.aclose()

    def _budget(self) -> float:
        """The longest one delivery may take, every attempt and wait included."""
        waits = sum(min(self.backoff * 2.0**i, self.backoff_max) for i in range(self.attempts - 1))
        return self.attempts * self.timeout + waits

    @property
    def consumers(self) -> tuple[tuple[str, str], ...]:
        """(stream, durable) of the JetStream consumer this service works, for its backlog's gauges."""
        return ((subjects.LOG_STREAM, subjects.RELAY_CONSUMER),) if self._pull is not None else ()

    async def _watch(self) -> None:
        """Follow the webhooks' bucket: ``hooks`` and ``joined`` as they are, ``_changed`` set on news."""
        while True:
            tail = Tail(self.js, subjects.WEBHOOKS_STREAM, f"{KEYS}>")
            try:
                async for msgs in tail.batches():
                    for msg in msgs:
                        take(msg, self.hooks, self.joined)
                    self._changed.set()
            except Exception as exc:
                reraise_if_cancelling()
                log.warning("webhooks: following the bucket failed (%r); again in 1 s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await tail.close()

    async def _run(self) -> None:
        # No consumer until there is a webhook: an installation without any pays nothing.
        while not self.hooks:
            self._changed.clear()
            await self._changed.wait()
        # Read one at a time at most BATCH ahead, in order; the ack wait covers a batch whose every
        # event takes a delivery's whole budget, and a retried one is kept alive besides.
        config = durable_pull(
            subjects.RELAY_CONSUMER, subjects.LOG_ALL, ack_wait=BATCH * self._budget() + 30.0, max_ack_pending=BATCH
        )
        self._pull = Pull(self.js, subjects.LOG_STREAM, config, batch=BATCH, group=RELAY_GROUP, pin_timeout=PIN_TIMEOUT)
        pull = self._pull
        async for msgs in pull.batches():
            for msg in msgs:
                # In place until it is done: an event is never passed over, nor handled out of order.
                while True:
                    try:
                        await self._handle(msg)
                        break
                    except Exception:
                        reraise_if_cancelling()
                        log.exception("webhook relay: log seq %d failed; trying it again", stream_seq(msg))
                        with contextlib.suppress(Exception):
                            await msg.in_progress()
                        await asyncio.sleep(1.0)
                pull.progressed()

    async def _handle(self, msg: Msg) -> None:
        seq = stream_seq(msg)
        await self._join_new(seq, msg)
        try:
            envelope = decode_event(msg.data)
        except DecodeError as exc:
            log.error("webhook relay: log seq %d is unreadable, not delivered: %s", seq, exc)
        else:
            joined = [h for h in list(self.hooks.values()) if h.id in self.joined]
            await self._deliver_all(msg, seq, envelope, joined, durable=True)
        await msg.ack()
        self.position = seq

    async def _join_new(self, seq: int, current: Msg) -> None:
        """Catch each webhook not joined yet up with the events it wants that the relay has passed
        (after the position it was added at, up to the furthest of ``seq - 1`` and what was handled
        already: ``seq`` may come again after a failure), then mark it joined: the consumer carries
        it from there. The ``current`` event is kept from redelivery meanwhile."""
        passed = max(seq - 1, self.position or 0)
        for hook in [h for h in list(self.hooks.values()) if h.id not in self.joined]:
            if passed > hook.after_seq:
                log.info("webhook %s: catching up from log seq %d to %d", hook.id, hook.after_seq + 1, passed)
                async for batch in read_stream(
                    self.js, subjects.LOG_STREAM, subjects.LOG_ALL, hook.after_seq + 1, passed
                ):
                    for old in batch:
                        try:
                            envelope = decode_event(old.data)
                        except DecodeError:
                            continue
                        await self._deliver_all(old, stream_seq(old), envelope, [hook], durable=False)
                        await current.in_progress()
                        if self._pull is not None:
                            self._pull.progressed()
            await mark_joined(self.kv, hook.id, passed)
            self.joined.add(hook.id)

    async def _deliver_all(self, msg: Msg, seq: int, envelope: Envelope, hooks: list[Webhook], durable: bool) -> None:
        """Deliver the event to each of ``hooks`` that wants it; ``durable``: ``msg`` is the relay
        consumer's, kept from redelivery while a webhook is retried (a catch-up's is not)."""
        wanted = [h for h in hooks if seq > h.after_seq and type_matches(h.types, envelope.type)]
        if wanted:
            body = msgspec.json.encode(envelope.data)
            headers = cloudevent_headers(envelope, seq)
            results = await asyncio.gather(
                *(self._deliver(h, msg, seq, body, headers, durable) for h in wanted), return_exceptions=True
            )
            for result in results:  # every delivery has ended: none goes on beside the next event
                if isinstance(result, BaseException):
                    raise result

    async def _deliver(
        self, hook: Webhook, msg: Msg, seq: int, body: bytes, headers: dict[str, str], durable: bool
    ) -> None:
        assert self._session is not None
        signed = {**headers, SIGNATURE_HEADER: signature(hook.secret, body)}
        problem = ""
        for attempt in range(1, self.attempts + 1):
            try:
                # The whole try within the timeout (httpx's bounds each step, not the request), and
                # the answer's body is never read: its status is all that counts.
                async with asyncio.timeout(self.timeout):
                    async with self._session.stream("POST", hook.url, content=body, headers=signed) as answer:
                        status, reason = answer.status_code, answer.reason_phrase
                if 200 <= status < 300:
                    metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                    return
                problem = f"HTTP {status} {reason}".strip()
            except Exception as exc:  # any failure is a failed try: a bad URL, a reset, a timeout
                reraise_if_cancelling()
                problem = f"{type(exc).__name__}: {exc}"[:300]
            metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
            if attempt < self.attempts:
                wait = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
                log.warning(
                    "webhook %s: log seq %d, try %d failed (%s); again in %gs", hook.id, seq, attempt, problem, wait
                )
                if durable:
                    await msg.in_progress()
                await asyncio.sleep(wait)
        metrics.WEBHOOK_DELIVERIES.labels("dead_lettered").inc()
        reason = f"webhook {hook.id} ({hook.url[:200]}): {problem}, after {self.attempts} tries"
        log.error("webhook relay: log seq %d dead-lettered: %s", seq, reason)
        await dead_letter(self.js, subjects.RELAY_CONSUMER, msg, reason, terminate=False, about=hook.id)
