"""A command's round on bare transport: the throughput benchmark's second baseline.

A stop or start through sandboxctl is a round of messages: the command and its
reply, two appends to the log guarded by the sandbox's last sequence, each
logged event read by three readers (the state machine, the driver worker, the
projector), the work order acknowledged, a fact stored, read and acknowledged,
and the projection's notice to whoever waits. ``js.publish_async`` measures one
of those legs; this module runs all of them, with the transport sandboxctl
uses (``sandboxctl.bus.publish``, ``sandboxctl.bus.pull.Pull``, ``sandboxctl.bus.tail.Tail``),
split over the same processes, and none of sandboxctl's own work: no envelope
built or decoded, no decide or evolve, no validation, no SQLite, no thread for
the engine call. Its rate is what the round's shape allows on the machine;
sandboxctl's rate against it is what sandboxctl's own code costs.

It is a benchmark part, not a product: it trusts its load generator, which
only ever sends commands that fit.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from sandboxctl.bus.eventlog import WRONG_LAST_SEQUENCE
from sandboxctl.bus.publish import publish
from sandboxctl.bus.pull import Pull
from sandboxctl.bus.streams import ensure_streams
from sandboxctl.bus.tail import Tail, stream_seq, unsubscribe
from sandboxctl.events import subjects
from sandboxctl.events.replies import Reply

# What each command appends, what its fact makes of it, and the phases the projection shows.
ORDER = {"create": "create_requested", "stop": "stop_requested", "start": "start_requested"}
ANSWER = {"create_requested": "ready", "stop_requested": "stopped", "start_requested": "ready"}
PHASE = {
    "create_requested": "Creating",
    "stop_requested": "Stopping",
    "start_requested": "Starting",
    "ready": "Ready",
    "stopped": "Stopped",
}
PAD = b"x" * 240  # an event about the size of sandboxctl's (~300 bytes), so the same bytes move


class _Named(msgspec.Struct):
    name: str
    command_id: str


class _Kind(msgspec.Struct):
    kind: str


_named = msgspec.json.Decoder(_Named).decode
_kind = msgspec.json.Decoder(_Kind).decode


def event(kind: str, name: str) -> bytes:
    return b'{"kind":"%s","name":"%s","pad":"%s"}' % (kind.encode(), name.encode(), PAD)


def kind_of(data: bytes) -> str:
    return _kind(data).kind


def work_queue(js: JetStreamContext, stream: str, durable: str, filter_subject: str, max_ack_pending: int) -> Pull:
    """A durable read with explicit acks from the start, as the state machine's facts and
    the workers' orders are read."""
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        max_ack_pending=max_ack_pending,
        filter_subject=filter_subject,
    )
    return Pull(js, stream, config)


class BareStateMachine:
    """Takes commands and facts, appends with the sequence guard, follows the log."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.last: dict[str, int] = {}
        self.position = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._sub: Any = None

    async def start(self) -> None:
        await ensure_streams(self.js)
        self._tail = Tail(self.js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=1)
        self._tasks.append(asyncio.create_task(self._follow()))
        self._tasks.append(asyncio.create_task(self._facts()))
        self._sub = await self.nc.subscribe(subjects.COMMANDS_ALL, queue="bare-statemachine", cb=self._on_command)

    async def stop(self) -> None:
        await unsubscribe(self._sub)
        for task in [*self._tasks, *self._inflight]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._inflight, return_exceptions=True)
        await self._tail.close()

    async def _append(self, name: str, kind: str, msg_id: str) -> int:
        while True:
            expected = self.last.get(name, 0)
            try:
                ack = await publish(
                    self.js,
                    subjects.log(name),
                    event(kind, name),
                    subjects.LOG_STREAM,
                    {"Nats-Msg-Id": msg_id, "Nats-Expected-Last-Subject-Sequence": str(expected)},
                )
            except APIError as exc:
                # Our own append's ack, still queued behind other deliveries, is what we have
                # not seen (a command can overtake it): take the sequence the server names.
                if exc.err_code not in WRONG_LAST_SEQUENCE:
                    raise
                self.last[name] = max(self.last.get(name, 0), int(str(exc.description).rsplit(" ", 1)[-1]))
                continue
            self.last[name] = max(self.last.get(name, 0), ack.seq)
            return ack.seq

    async def _on_command(self, msg: Msg) -> None:
        task = asyncio.create_task(self._command(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _command(self, msg: Msg) -> None:
        command = _named(msg.data)
        kind = ORDER[msg.subject.rsplit(".", 1)[-1]]
        seq = await self._append(command.name, kind, command.command_id)
        reply = Reply(accepted=True, sandbox=command.name, phase=PHASE[kind], seq=seq, appended=1)
        await msg.respond(msgspec.json.encode(reply))

    async def _follow(self) -> None:
        async for batch in self._tail.batches():
            if batch:
                self.position = stream_seq(batch[-1])

    async def _facts(self) -> None:
        pull = work_queue(self.js, subjects.FACTS_STREAM, "bare-statemachine", subjects.FACTS_ALL, 10_000)
        try:
            async for msgs in pull.batches():
                await asyncio.gather(*(self._fact(msg) for msg in msgs))
        finally:
            await pull.close()

    async def _fact(self, msg: Msg) -> None:
        name = subjects.name_of(msg.subject)
        await self._append(name, kind_of(msg.data), f"{msg.reply}:phase")
        await msg.ack()


class BarePlane:
    """A worker that answers every order at once with a fact, and a projector that only announces."""

    def __init__(self, worker_nc: NATS, projector_nc: NATS) -> None:
        self.worker_js = worker_nc.jetstream()
        self.projector_nc = projector_nc
        self.projector_js = projector_nc.jetstream()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await ensure_streams(self.worker_js)
        self._tail = Tail(self.projector_js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=1)
        self._tasks.append(asyncio.create_task(self._work()))
        self._tasks.append(asyncio.create_task(self._project()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._tail.close()

    async def _work(self) -> None:
        pull = work_queue(self.worker_js, subjects.LOG_STREAM, "bare-worker", subjects.LOG_ALL, 20_000)
        try:
            async for msgs in pull.batches():
                for msg in msgs:
                    answer = ANSWER.get(kind_of(msg.data))
                    if answer is None:
                        await msg.ack()  # a phase: nothing to do
                        continue
                    task = asyncio.create_task(self._answer(msg, answer))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
        finally:
            await pull.close()

    async def _answer(self, msg: Msg, answer: str) -> None:
        name = subjects.name_of(msg.subject)
        fact = event(answer, name)
        await publish(self.worker_js, subjects.fact(name), fact, subjects.FACTS_STREAM, {"Nats-Msg-Id": msg.reply})
        await msg.ack()

    async def _project(self) -> None:
        async for batch in self._tail.batches():
            changed: dict[str, tuple[str, int]] = {}
            for msg in batch:
                changed[subjects.name_of(msg.subject)] = (kind_of(msg.data), stream_seq(msg))
            for name, (kind, seq) in changed.items():
                notice = b'{"name":"%s","phase":"%s","seq":%d}' % (name.encode(), PHASE[kind].encode(), seq)
                await self.projector_nc.publish(subjects.projected(name), notice)
