"""The driver worker: does the work the log asks for and reports facts.

It reads the log through a durable consumer, so work survives a restart, and
acknowledges an event only after the fact it caused is stored in the facts
stream. Work for one sandbox runs in log order; different sandboxes run in
parallel, which is what makes ``stop --all`` cost about one engine call.

Fact ids are derived from the container and its incarnation, so the fact an
operation reports at once and the copy the engine watcher sees later are the
same message, and JetStream stores it once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from drivers.base import ContainerInfo, ContainerMissing, Driver, DriverError, EngineEvent, SandboxSpec
from events import subjects
from events.envelope import Envelope, new_id, now, type_name
from events.facts import ContainerCreated, ContainerExited, ContainerRemoved, ContainerStarted, DriverFailed, Fact
from events.lifecycle import SandboxCreated, SandboxDeleteRequested, SandboxStartRequested, SandboxStopRequested
from services.log import DecodeError, decode_event, ensure_streams, publish_fact
from services.tail import fetch, reraise_if_cancelling

log = logging.getLogger(__name__)

Facts = list[tuple[str, Fact]]


def started(info: ContainerInfo) -> tuple[str, Fact]:
    return (
        f"{info.container_id}:{info.incarnation}:started",
        ContainerStarted(container_id=info.container_id, incarnation=info.incarnation),
    )


def exited(info: ContainerInfo, requested: bool) -> tuple[str, Fact]:
    return (
        f"{info.container_id}:{info.incarnation}:exited",
        ContainerExited(
            container_id=info.container_id,
            exit_code=info.exit_code,
            requested=requested,
            oom=info.oom,
            incarnation=info.incarnation,
        ),
    )


def removed(container_id: str, fallback_id: str) -> tuple[str, Fact]:
    return (f"{container_id or fallback_id}:removed", ContainerRemoved(container_id=container_id))


class DriverWorker:
    def __init__(self, nc: NATS, driver: Driver, max_parallel: int = 256) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.driver = driver
        self.source = f"sandboxctl/driver/{driver.name}"
        self.consumer = f"sandboxctl-driver-{driver.name}"
        self._queues: dict[str, asyncio.Queue[Msg]] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_parallel)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = threading.Event()

    async def start(self) -> None:
        await ensure_streams(self.js)
        self._tasks.append(asyncio.create_task(self._consume(), name=f"{self.consumer}-work"))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"{self.consumer}-watch"))

    async def stop(self) -> None:
        self._stopping.set()
        for task in [*self._tasks, *self._runners.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._runners.values(), return_exceptions=True)

    # -- work from the log -------------------------------------------------------

    async def _consume(self) -> None:
        config = ConsumerConfig(
            durable_name=self.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=300.0,
            max_ack_pending=20_000,
            filter_subject=subjects.LOG_ALL,
        )
        psub = None
        while True:
            try:
                if psub is None:
                    psub = await self.js.pull_subscribe(
                        subjects.LOG_ALL, durable=self.consumer, stream=subjects.LOG_STREAM, config=config
                    )
                msgs = await fetch(psub, 256, 1.0)
                for msg in msgs:
                    self._enqueue(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reraise_if_cancelling()
                log.warning("%s: %r; resubscribing", self.consumer, exc)
                psub = None
                await asyncio.sleep(0.25)

    def _enqueue(self, msg: Msg) -> None:
        name = subjects.name_of(msg.subject)
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = asyncio.Queue()
            self._runners[name] = asyncio.create_task(self._run_sandbox(name, queue))
        queue.put_nowait(msg)

    async def _run_sandbox(self, name: str, queue: asyncio.Queue[Msg]) -> None:
        try:
            while True:
                try:
                    msg = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                async with self._slots:
                    await self._handle(msg)
        finally:
            self._queues.pop(name, None)
            self._runners.pop(name, None)

    async def _handle(self, msg: Msg) -> None:
        try:
            envelope = decode_event(msg.data)
        except DecodeError as exc:
            log.error("%s: skipping unreadable log entry: %s", self.consumer, exc)
            await msg.ack()
            return
        event = envelope.data
        if getattr(event, "driver", None) != self.driver.name:
            await msg.ack()
            return
        keepalive = asyncio.create_task(self._in_progress(msg))
        try:
            facts = await self.perform(envelope)
            for fact_id, fact in facts:
                await self.report(envelope.subject, fact_id, fact, cause=envelope)
        except Exception:
            log.exception("%s: %s on %s failed; it will be redelivered", self.consumer, envelope.type, envelope.subject)
            await msg.nak(delay=1.0)
            return
        finally:
            keepalive.cancel()
        await msg.ack()

    @staticmethod
    async def _in_progress(msg: Msg) -> None:
        while True:
            await asyncio.sleep(60)
            await msg.in_progress()

    async def perform(self, envelope: Envelope) -> Facts:
        """Drive the engine for one work order; engine errors become DriverFailed facts."""
        event = envelope.data
        name = envelope.subject
        facts: Facts = []
        run: Callable[..., Any] = asyncio.to_thread
        try:
            if isinstance(event, SandboxCreated):
                spec = SandboxSpec(
                    name=name,
                    sandbox_id=event.sandbox_id,
                    image=event.image,
                    command=event.command,
                    labels=event.labels,
                )
                info = await run(self.driver.create, spec)
                facts.append((f"{info.container_id}:created", ContainerCreated(container_id=info.container_id)))
                facts.append(started(await run(self.driver.start, name)))
            elif isinstance(event, SandboxStopRequested):
                info = await run(self.driver.stop, name, event.timeout)
                facts.append(exited(info, requested=True) if not info.running else started(info))
            elif isinstance(event, SandboxStartRequested):
                facts.append(started(await run(self.driver.start, name)))
            elif isinstance(event, SandboxDeleteRequested):
                facts.append(removed(await run(self.driver.delete, name), envelope.id))
        except ContainerMissing:
            facts.append(removed("", envelope.id))
        except DriverError as exc:
            facts.append((f"{envelope.id}:failed", DriverFailed(operation=exc.operation, message=exc.message)))
        return facts

    async def report(self, name: str, fact_id: str, fact: Fact, cause: Envelope | None = None) -> None:
        envelope = Envelope(
            id=fact_id,
            type=type_name(type(fact)),
            source=self.source,
            subject=name,
            time=now(),
            data=fact,
            actor=self.source,
            correlationid=cause.correlationid if cause else new_id(),
            causationid=cause.id if cause else "",
        )
        await publish_fact(self.js, envelope)

    # -- changes made outside sandboxctl -----------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent | Exception] = asyncio.Queue()

        def pump() -> None:
            try:
                while not self._stopping.is_set():
                    try:
                        for event in self.driver.events():
                            if self._stopping.is_set():
                                return
                            loop.call_soon_threadsafe(queue.put_nowait, event)
                    except Exception as exc:
                        if self._stopping.is_set():
                            return
                        loop.call_soon_threadsafe(queue.put_nowait, exc)
                    self._stopping.wait(1.0)
            except RuntimeError:
                return  # the event loop has closed under us

        threading.Thread(target=pump, name=f"{self.consumer}-events", daemon=True).start()
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                log.warning("%s: engine event stream lost: %s; reconnecting", self.consumer, item)
                continue
            try:
                await self.observe(item)
            except Exception:
                log.exception("%s: could not report %s", self.consumer, item)

    async def observe(self, event: EngineEvent) -> None:
        if event.action == "remove":
            fact_id, fact = removed(event.container_id, event.container_id)
            await self.report(event.sandbox, fact_id, fact)
            return
        info = await asyncio.to_thread(self.driver.inspect, event.sandbox)
        if info is None or info.container_id != event.container_id:
            return  # gone already; its removal is reported on its own
        if event.action == "die" and not info.running:
            fact_id, fact = exited(info, requested=False)
        elif event.action == "start" and info.running:
            fact_id, fact = started(info)
        else:
            return  # the container changed again since; the later event reports it
        await self.report(event.sandbox, fact_id, fact)
