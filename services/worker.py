"""The driver worker: does the work the log asks for and reports facts.

It reads the log through a durable consumer, so work survives a restart, and
acknowledges an event only after the fact it caused is stored in the facts
stream. Work for one sandbox runs in log order; different sandboxes run in
parallel, which is what makes ``stop --all`` cost about one engine call.

A work order's facts are keyed by the work order, so a redelivered order
reports once; the engine watcher's facts are keyed by the container and its
run, so repeated engine events report once. When both report the same change,
the second one moves nothing: ``react`` fences by incarnation and phase.

The phase follows the engine, not the engine's silence: an engine that took a
request and stopped answering (paused, overloaded: a read timeout) is looked at
again with backoff while the order stays in hand, and what it then shows is the
outcome (``_patiently``); only an engine that refuses the connection fails the
order at once. A start whose container was removed outside sandboxctl makes it
again from the log's record while the workspace volume is intact (``_remake``).
A second stop (a shorter grace) goes to the engine at once, beside the first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from sandboxctl.bus.eventlog import (
    DecodeError,
    Failures,
    dead_letter,
    decode_event,
    last_subject_seq,
    publish_fact,
    retry_delay,
)
from sandboxctl.bus.hosts import ADOPTS, claim_unplaced
from sandboxctl.bus.publish import cannot_store
from sandboxctl.bus.pull import Pull
from sandboxctl.bus.reading import load_states, read_events, recorded_spec
from sandboxctl.bus.streams import (
    MAX_DELIVER,
    chunks_stored,
    durable_pull,
    ensure_streams,
    purge_orphan_chunks,
    workspaces,
)
from sandboxctl.bus.tail import deliveries, reraise_if_cancelling, stream_seq
from sandboxctl.drivers.base import (
    WORKSPACE,
    ContainerInfo,
    ContainerMissing,
    Driver,
    DriverError,
    EngineEvent,
    EngineTimeout,
    SandboxSpec,
    container_name,
    made_with,
    volume_name,
)
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, new_id, now, type_name
from sandboxctl.events.facts import (
    ContainerCreated,
    ContainerExited,
    ContainerOrphaned,
    ContainerPaused,
    ContainerRemoved,
    ContainerResumed,
    ContainerStarted,
    DriverFailed,
    Fact,
    WorkspaceArchived,
)
from sandboxctl.events.lifecycle import (
    EVENT_TYPES,
    WORK_ORDERS,
    SandboxArchiveRequested,
    SandboxCreated,
    SandboxDeleteRequested,
    SandboxPauseRequested,
    SandboxResumeRequested,
    SandboxStartRequested,
    SandboxStopRequested,
)
from sandboxctl.events.spec import Resources
from sandboxctl.observe import metrics, tracing
from sandboxctl.services.threads import EngineThreads
from sandboxctl.statemachine import Phase, SandboxState
from sandboxctl.statemachine.deadlines import DEFAULT_DEADLINES
from sandboxctl.statemachine.names import validate_name

log = logging.getLogger(__name__)

Facts = list[tuple[str, Fact]]

# Chunks no object names (a put cut short) are purged once their newest is this old: twice the
# Archiving deadline, which no put still under way outlives.
ORPHAN_CHUNKS_AGE = 2 * DEFAULT_DEADLINES[Phase.ARCHIVING]
WORK_ACK_WAIT = 15.0  # seconds before an order not acknowledged nor kept alive is delivered again
# Seconds an operation waits for an engine that took its request and stopped answering (paused,
# overloaded) before it is reported failed: under the state machine's watchdog (300 s by default),
# which fails a transient phase after its deadline anyway.
ENGINE_PATIENCE = 240.0
ENGINE_BACKOFF = (0.5, 10.0)  # the first and the longest wait between two looks at such an engine
STOP_GRACE = 10.0  # the grace of a stop reconciliation completes when the log does not say how long is left


_TYPE = re.compile(rb'"type":"([^"]*)"')
# The log events that give a driver work (events.lifecycle.WORK_ORDERS), and those that give
# none: the phases the state machine decided, and the notes of use, leases and holds.
_ORDERS = frozenset(cls.TYPE for cls in WORK_ORDERS)
_PHASES = frozenset(EVENT_TYPES) - _ORDERS
_DELETE, _STOP = SandboxDeleteRequested.TYPE, SandboxStopRequested.TYPE


def _raw_type(data: bytes) -> str:
    """A log entry's type read from its JSON without decoding it (the envelope's ``type`` is
    its first ``"type"`` key), so that routing never matches words in the event's data."""
    found = _TYPE.search(data)
    return found.group(1).decode() if found else ""


def spec_of(name: str, created: SandboxCreated) -> SandboxSpec:
    """The container a sandbox's SandboxCreated asks for."""
    return SandboxSpec(
        name=name,
        sandbox_id=created.sandbox_id,
        image=created.image,
        command=created.command,
        labels=created.labels,
        resources=created.resources,
        env=created.env,
    )


REPORTED = ""  # the key of a fact a work order reported while it was worked (a create's ContainerCreated)


def order_fact_id(order: Envelope, index: int) -> str:
    """The id (Nats-Msg-Id) of a work order's ``index``-th fact: the same on every delivery of
    the order, so a fact reported again is stored once."""
    return f"{order.id}:fact:{index}"


def made(info: ContainerInfo) -> tuple[str, Fact]:
    return (
        f"{info.container_id}:created",
        ContainerCreated(container_id=info.container_id, sandbox_id=info.sandbox_id),
    )


def started(info: ContainerInfo) -> tuple[str, Fact]:
    return (
        f"{info.container_id}:{info.incarnation}:started",
        ContainerStarted(container_id=info.container_id, sandbox_id=info.sandbox_id, incarnation=info.incarnation),
    )


def exited(info: ContainerInfo, requested: bool) -> tuple[str, Fact]:
    return (
        f"{info.container_id}:{info.incarnation}:exited",
        ContainerExited(
            container_id=info.container_id,
            sandbox_id=info.sandbox_id,
            exit_code=info.exit_code,
            requested=requested,
            oom=info.oom,
            incarnation=info.incarnation,
        ),
    )


def frozen(info: ContainerInfo, when: int = 0) -> tuple[str, Fact]:
    """The container is paused (``when``: the engine's event time, since a run may pause often)."""
    return (
        f"{info.container_id}:{info.incarnation}:paused:{when}",
        ContainerPaused(container_id=info.container_id, sandbox_id=info.sandbox_id, incarnation=info.incarnation),
    )


def thawed(info: ContainerInfo, when: int = 0) -> tuple[str, Fact]:
    return (
        f"{info.container_id}:{info.incarnation}:resumed:{when}",
        ContainerResumed(container_id=info.container_id, sandbox_id=info.sandbox_id, incarnation=info.incarnation),
    )


def removed(container_id: str, sandbox_id: str, fallback_id: str, workspace: bool = False) -> tuple[str, Fact]:
    return (
        f"{container_id or fallback_id}:removed",
        ContainerRemoved(container_id=container_id, sandbox_id=sandbox_id, workspace_removed=workspace),
    )


def failed(exc: DriverError, sandbox_id: str, fact_id: str) -> tuple[str, Fact]:
    return (f"{fact_id}:failed", DriverFailed(operation=exc.operation, message=exc.message, sandbox_id=sandbox_id))


class _Connected:
    """Marks that the engine's event stream (re)connected, replaying from ``since``."""


CONNECTED = _Connected()


class DriverWorker:
    """Does on one engine what the log asks, and reports what the engine does.

    Consumes: the log's work orders (a durable consumer: created, stop, start and delete
    requested) for its engine, and the engine's own event stream. Produces: driver facts on
    ``sandboxctl.fact.<host>.<name>`` (started, exited, removed, failed, orphaned). Promises: an order is
    acknowledged only once its fact is stored; an order overtaken by a later request is skipped;
    nothing that does not carry the sandbox's id is touched; reconciliation at every (re)connect
    leaves no sandbox in a phase the engine contradicts."""

    def __init__(
        self,
        nc: NATS,
        driver: Driver,
        max_parallel: int | None = None,
        restart_exited: bool = True,
        retry_wait: float = 1.0,
        replicas: int | None = None,
        host: str = "",
        first_seq: int = 0,
        may_adopt: bool = True,
    ) -> None:
        self.nc = nc
        # The host this worker's engine runs on: it works the orders of the sandboxes placed there
        # alone, and, if it adopted them (see _work_consumer), those placed on no host (created
        # before hosts, or by a plane that places none). "": a worker of no host, which works
        # only those. first_seq: the log's end when the host was announced (0: ask the log).
        # may_adopt: whether it may take those over (another machine's worker user may not).
        self.host = host
        self.may_adopt = may_adopt
        self.first_seq = first_seq
        self.adopt_unplaced = not host
        self.replicas = replicas  # of the archived workspaces' bucket, when this worker makes it
        self.js = nc.jetstream()
        self.driver = driver
        self.restart_exited = restart_exited
        self.retry_wait = retry_wait
        # Its facts' source, the host included: an operator (and a test) sees which host reported what.
        self.source = f"sandboxctl/driver/{driver.name}" + (f"/{host}" if host else "")
        self.consumer = f"sandboxctl-driver-{driver.name}"  # its name in logs and dead letters
        # Its durable consumer of the log: one per host, as each host's worker reads every order.
        self.durable = f"{self.consumer}-{host}" if host else self.consumer
        self.reconciliations = 0  # completed sweeps, for operators and tests
        self._queues: dict[str, asyncio.Queue[Msg]] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # The log position of the latest request (create, stop, start, delete) seen per name:
        # an order before it is superseded (see _superseded).
        self._latest_request: dict[str, int] = {}
        # Orders received and not yet acknowledged, by stream sequence: kept alive while they
        # wait their turn, and a redelivery of one still in hand is not run twice.
        self._held: dict[int, Msg] = {}
        self._failures = Failures()  # each order's own failures, before it is dead-lettered
        # Sandboxes with a stop order in the engine right now: a later stop (a shorter grace)
        # runs at once beside it rather than waiting out the first one's grace behind it.
        self._stops_in_engine: dict[str, int] = {}
        # Containers this worker removed to make them again with new resources: their removal,
        # when the engine's event stream reports it, is no news about the sandbox.
        self._replaced: set[str] = set()
        # Work orders share the engine's parallelism; deletes, the watcher and
        # reconciliation run on threads beside them (at most 256 in all).
        self._slots = asyncio.Semaphore(max_parallel or driver.parallelism)
        self.tasks: list[asyncio.Task[None]] = []
        self._urgent: set[asyncio.Task[None]] = set()
        self._threads = EngineThreads(256, f"driver-{driver.name}")
        self._stopping = threading.Event()

    async def start(self) -> None:
        await ensure_streams(self.js)
        self.driver.prepare()
        # Made before anything is placed on this host (its announcement comes after the workers
        # have started), so that no order for it can come before its consumer's first position.
        if self.host and not self.first_seq:
            self.first_seq = (await self.js.stream_info(subjects.LOG_STREAM)).state.last_seq + 1
        self._config = await self._work_consumer()
        self.tasks.append(asyncio.create_task(self._watch(), name=f"{self.consumer}-watch"))
        self.tasks.append(asyncio.create_task(self._consume(), name=f"{self.consumer}-work"))
        self.tasks.append(asyncio.create_task(self._keep_alive(), name=f"{self.consumer}-keepalive"))

    async def stop(self) -> None:
        self._stopping.set()
        tasks = [*self.tasks, *self._runners.values(), *self._urgent]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._threads.shutdown()

    @property
    def consumers(self) -> tuple[tuple[str, str], ...]:
        """(stream, durable) of the JetStream consumer this worker works, for its backlog's gauges."""
        return ((subjects.LOG_STREAM, self.durable),)

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Engine calls block (the SDKs are synchronous); they run on the worker's own threads,
        which ``stop`` abandons rather than waits for: a stop hanging in the engine cannot hold us.
        Each call of the driver's own is timed (sandboxctl_engine_call_seconds)."""
        call = functools.partial(fn, **kwargs) if kwargs else fn
        if getattr(fn, "__self__", None) is not self.driver:
            return await self._threads.call(call, *args)
        began, outcome = time.monotonic(), "error"
        try:
            with tracing.step(f"engine {self.driver.name}.{fn.__name__}"):
                result = await self._threads.call(call, *args)
            outcome = "ok"
            return result
        finally:
            metrics.ENGINE_CALLS.labels(self.driver.name, fn.__name__, outcome).observe(time.monotonic() - began)

    def _lock(self, name: str) -> asyncio.Lock:
        # Work orders and reconciliation of one sandbox never interleave.
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    # -- work from the log -------------------------------------------------------

    async def _consume(self) -> None:
        # A short ack wait, so that the orders a killed worker held are redelivered soon to the
        # next one; those still in hand are kept alive (_keep_alive), however long they wait.
        pull = Pull(self.js, subjects.LOG_STREAM, self._config)
        try:
            async for msgs in pull.batches():
                for msg in msgs:
                    try:
                        if not self._enqueue(msg):
                            await msg.ack()  # a phase, not an order: nothing to do, nothing to wait behind
                    except Exception:  # what was not acknowledged comes again after the ack wait
                        reraise_if_cancelling()
                        log.exception("%s: could not take %s", self.consumer, msg.subject)
        finally:
            await pull.close()

    async def _work_consumer(self) -> ConsumerConfig:
        """The configuration of this worker's durable consumer of the log, made if missing, and
        whether it works the sandboxes placed on no host (``adopt_unplaced``).

        A host's consumer made for the first time starts at ``first_seq``, the log's end when its
        host was announced: no order can be for a host before it is announced. One host of each
        engine, the first to claim it (a key in the hosts' bucket, made once), takes over from the
        consumer of no host (every order of the engine, before hosts) where it had got to, and
        works from then on the sandboxes placed before hosts; an order that consumer had taken
        past its last acknowledged one may come again, as any redelivery does."""
        config = durable_pull(self.durable, subjects.LOG_ALL, ack_wait=WORK_ACK_WAIT, max_ack_pending=20_000)
        if self.durable == self.consumer:
            self.adopt_unplaced = True
            return config
        try:
            made = (await self.js.consumer_info(subjects.LOG_STREAM, self.durable)).config
            self.adopt_unplaced = (made.metadata or {}).get(ADOPTS) == "1"
            return dataclasses.replace(
                config,
                deliver_policy=made.deliver_policy or DeliverPolicy.ALL,
                opt_start_seq=made.opt_start_seq,
                metadata=made.metadata,
            )
        except NotFoundError:
            pass
        start = self.first_seq
        self.adopt_unplaced = False
        legacy = None
        if self.may_adopt:
            with contextlib.suppress(NotFoundError):
                legacy = await self.js.consumer_info(subjects.LOG_STREAM, self.consumer)
        if legacy is not None and await claim_unplaced(self.js, self.driver.name, self.host):
            start = (legacy.ack_floor.stream_seq if legacy.ack_floor else 0) + 1
            self.adopt_unplaced = True
        config = dataclasses.replace(
            config,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(start, 1),
            metadata={ADOPTS: "1" if self.adopt_unplaced else "0"},
        )
        await self.js.add_consumer(subjects.LOG_STREAM, config=config)
        return config

    def _mine(self, event: object) -> bool:
        """Whether a work order is this worker's: of its engine, for a sandbox on its host."""
        if getattr(event, "driver", None) != self.driver.name:
            return False
        host = getattr(event, "host", "")
        return host == self.host or (not host and self.adopt_unplaced)

    def _enqueue(self, msg: Msg) -> bool:
        """Queue a work order behind its sandbox's earlier ones; False for a log entry that
        orders no work (half the log: the phases the state machine decides), which needs
        neither a queue nor a decode. An entry of no known type is queued, to be dead-lettered."""
        kind = _raw_type(msg.data)
        if kind in _PHASES:
            return False
        name = subjects.name_of(msg.subject)
        seq = stream_seq(msg)
        if seq in self._held:
            return True  # redelivered while still in hand (a slow engine): the first copy runs
        self._held[seq] = msg
        if kind in _ORDERS:
            self._latest_request[name] = max(seq, self._latest_request.get(name, 0))
        if kind == _DELETE or (kind == _STOP and self._stops_in_engine.get(name)):
            # A delete force-removes, so it need not wait behind a stop or start that
            # hangs in the engine: that is how a user gets out of a stuck sandbox. A second
            # stop (a shorter grace) must reach the engine while the first waits out its grace.
            task = asyncio.create_task(self._handle_now(msg))
            self._urgent.add(task)
            task.add_done_callback(self._urgent.discard)
            return True
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = asyncio.Queue()
            self._runners[name] = asyncio.create_task(self._run_sandbox(name, queue))
        queue.put_nowait(msg)
        return True

    async def _run_sandbox(self, name: str, queue: asyncio.Queue[Msg]) -> None:
        try:
            while True:
                reraise_if_cancelling()
                try:
                    msg = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                async with self._slots, self._lock(name):
                    await self._handle(msg)
        finally:
            self._queues.pop(name, None)
            self._runners.pop(name, None)

    async def _handle_now(self, msg: Msg) -> None:
        await self._handle(msg)  # no slot: it must not wait behind operations hung in the engine

    async def _handle(self, msg: Msg) -> None:
        """Work one order, whatever happens: an error escaping it would end its sandbox's runner
        and leave the orders queued behind it in hand, kept alive and never worked. One that could
        not be settled (acknowledged, naked) is let go: it comes again after the ack wait."""
        try:
            await self._work(msg)
        except Exception:
            reraise_if_cancelling()
            log.exception("%s: %s could not be settled; it comes again after %.0f s", self.consumer,
                          msg.subject, WORK_ACK_WAIT)  # fmt: skip
        finally:
            self._held.pop(stream_seq(msg), None)

    async def _work(self, msg: Msg) -> None:
        try:
            envelope = decode_event(msg.data)
        except DecodeError as exc:
            log.error("%s: dead-lettering unreadable log entry: %s", self.consumer, exc)
            await dead_letter(self.js, self.consumer, msg, f"unreadable log entry: {exc}")
            return
        event = envelope.data
        if envelope.subject != subjects.name_of(msg.subject):
            # Written by someone else on another sandbox's subject: every reader of the log skips
            # it (bus.eventlog.fold_logged), and no engine is touched for it.
            log.error("%s: a %s on %s names sandbox %r; skipped", self.consumer, envelope.type, msg.subject,
                      envelope.subject[:80])  # fmt: skip
            await msg.ack()
            return
        try:
            if not self._mine(event) or await self._superseded(msg, envelope):
                await msg.ack()
                return
            with tracing.consumed(f"work {envelope.type}", msg.subject, msg.headers):
                facts = await self.perform(envelope)
                # Keyed by the work order, not the container run: a start of a container
                # that is still running reports the same run as before, and is still news.
                for index, (key, fact) in enumerate(facts):
                    if key == REPORTED:  # reported while the order was worked, under this same id
                        continue
                    fact.request_id = envelope.id  # an answer to this work order, not an observation
                    await self.report(envelope.subject, order_fact_id(envelope, index), fact, cause=envelope)
        except Exception as exc:
            reraise_if_cancelling()
            if cannot_store(exc):
                # The bus's trouble, not the order's (its facts could not be stored, or the log
                # could not be read, for now): the order comes again until it goes through, and
                # the engine's side is idempotent. Not counted against it.
                log.warning(
                    "%s: %s on %s: the bus cannot take it for now (%r); it will be redelivered",
                    self.consumer, envelope.type, envelope.subject, exc,
                )  # fmt: skip
                await msg.nak(delay=retry_delay(deliveries(msg)))
                return
            failed = self._failures.failed(msg)
            if failed >= MAX_DELIVER:
                log.exception("%s: %s on %s failed %d times; dead-lettered", self.consumer, envelope.type,
                              envelope.subject, failed)  # fmt: skip
                await dead_letter(self.js, self.consumer, msg, f"{type(exc).__name__}: {exc}")
                self._failures.forget(msg)
            else:
                log.exception(
                    "%s: %s on %s failed; it will be redelivered", self.consumer, envelope.type, envelope.subject
                )
                await msg.nak(delay=retry_delay(failed))
            return
        await msg.ack()
        self._failures.forget(msg)

    async def _superseded(self, msg: Msg, envelope: Envelope) -> bool:
        """Whether a later request on the same name has overtaken this work order.

        Delivery is at least once: an order whose worker died before acknowledging it comes
        again, possibly after the sandbox has moved on (the stop was done, a start won since,
        or the sandbox was deleted and its name created again). Containers are addressed by
        name, so running it then would stop the newer run, or touch the new sandbox. An order
        is current while no later request is in the log; the requests this worker has seen
        answer that at once, and a redelivery, which may come before what it missed, asks the log.
        """
        name, seq = subjects.name_of(msg.subject), stream_seq(msg)
        if self._latest_request.get(name, 0) <= seq and deliveries(msg) > 1:
            if await last_subject_seq(self.js, name) > seq:
                async for later, logged, _ in read_events(self.js, name, start=seq + 1):
                    if isinstance(logged, Envelope) and logged.type in _ORDERS:
                        self._latest_request[name] = max(later, self._latest_request.get(name, 0))
                        break
        if self._latest_request.get(name, 0) > seq:
            log.warning(
                "%s: %s of %s at %d is superseded by a later request; skipped", self.consumer, envelope.type, name, seq
            )
            return True
        return False

    async def _keep_alive(self) -> None:
        """Tell the server every order in hand is being worked on, so none is redelivered while
        it waits its turn behind the sandbox's earlier orders or the engine's parallelism."""
        while True:
            reraise_if_cancelling()
            await asyncio.sleep(WORK_ACK_WAIT / 3)
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:
                    reraise_if_cancelling()
                    log.debug("%s: in-progress for %s: %r", self.consumer, msg.subject, exc)

    async def perform(self, envelope: Envelope) -> Facts:
        """Drive the engine for one work order; engine errors become DriverFailed facts."""
        event = envelope.data
        name = envelope.subject
        sandbox_id = getattr(event, "sandbox_id", "")
        facts: Facts = []
        reporting: asyncio.Future[None] | None = None
        try:
            if isinstance(event, SandboxCreated) and event.clone_from:
                facts.extend(await self._clone(spec_of(name, event), event))
            elif isinstance(event, SandboxCreated):
                # ContainerCreated is reported while the container starts, once the start is under
                # way (the driver says so: a VM once its qemu runs, so its launch is not kept waiting
                # on the report): the state machine has taken it by the time the start is reported,
                # so Ready waits for one fact, not two. The start's outcome, a failure too, is this
                # order's second fact.
                spec = spec_of(name, event)
                info = await self._patiently(self.driver.create, spec)
                _, created = made(info)
                created.request_id = envelope.id
                facts.append((REPORTED, created))
                loop = asyncio.get_running_loop()
                running: asyncio.Future[None] = loop.create_future()

                def ran() -> None:
                    if not running.done():
                        running.set_result(None)

                async def report_created() -> None:
                    await running
                    await self.report(name, order_fact_id(envelope, 0), created, cause=envelope)

                reporting = asyncio.ensure_future(report_created())

                def launched() -> None:  # on the driver's thread; the loop may be gone (a stop)
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(ran)

                try:
                    facts.append(started(await self._start_container(name, spec.sandbox_id, launched)))
                finally:
                    ran()  # the start is over (or never said it launched): reported now
            elif isinstance(event, SandboxStopRequested):
                info = await self._stop(name, sandbox_id, event.timeout)
                facts.append(exited(info, requested=True) if not info.running else started(info))
            elif isinstance(event, SandboxStartRequested):
                if event.restore:
                    try:
                        facts.extend(await self._restore(name, sandbox_id, event.restore))
                    except ContainerMissing:  # removed outside while the files streamed in
                        raise DriverError("start", f"the container of {name} was removed during its restore") from None
                else:
                    facts.extend(await self._start(name, sandbox_id, event.resources if event.remake else None))
            elif isinstance(event, SandboxArchiveRequested):
                try:
                    facts.append(await self._archive(name, sandbox_id, event.object))
                except ContainerMissing:  # removed outside while its workspace streamed out
                    raise DriverError("archive", f"the container of {name} was removed during the archive") from None
            elif isinstance(event, SandboxPauseRequested):
                info = await self._patiently(self.driver.pause, name, sandbox_id, done=lambda i: i.paused)
                facts.append(frozen(info) if info.paused else exited(info, requested=False))
            elif isinstance(event, SandboxResumeRequested):
                info = await self._patiently(
                    self.driver.resume, name, sandbox_id, done=lambda i: i.running and not i.paused
                )
                facts.append(thawed(info) if info.running else exited(info, requested=False))
            elif isinstance(event, SandboxDeleteRequested):
                # The only report that ends a delete: container and workspace are both gone (and an
                # archive of the workspace, if there is one).
                container_id = await self._patiently(self.driver.delete, name, sandbox_id)
                # Whether or not the log says it is archived: an archive under way when the delete
                # came may have stored it since.
                with contextlib.suppress(NotFoundError):
                    store = await workspaces(self.js, self.replicas)
                    await store.delete(event.archive or subjects.workspace_object(name, sandbox_id))
                facts.append(removed(container_id, sandbox_id, envelope.id, workspace=True))
        except ContainerMissing:
            facts.append(removed("", sandbox_id, envelope.id))
        except DriverError as exc:
            facts.append(failed(exc, sandbox_id, envelope.id))
        finally:
            if reporting is not None:  # stored before any later fact of the order is reported
                await reporting
        return facts

    async def _make(self, spec: SandboxSpec, again: bool = False) -> Facts:
        """Make the container (``again``: in place of the sandbox's own, on its workspace) and start it."""
        info = await self._patiently(self.driver.remake if again else self.driver.create, spec)
        return [made(info), started(await self._start_container(spec.name, spec.sandbox_id))]

    async def _clone(self, spec: SandboxSpec, event: SandboxCreated) -> Facts:
        """Make the clone's container on a workspace of its own, copy the source's workspace into it
        (a source that runs is paused for the copy and resumed, as its log then shows), start it."""
        info = await self._patiently(self.driver.create, spec)
        source, source_id = event.clone_from, event.clone_from_id
        paused = False
        # The source's queued orders (an archive of it above all) wait meanwhile, so none removes
        # the volume being copied.
        async with self._lock(source):
            try:
                if event.clone_paused:
                    running = await self._run(self.driver.inspect, source, source_id)
                    if running is not None and running.running and not running.paused:
                        await self._run(self.driver.pause, source, source_id)
                        paused = True
                await self._run(self.driver.copy_workspace, source, source_id, spec.name, spec.sandbox_id)
            finally:
                if paused:
                    await self._run(self.driver.resume, source, source_id)
        return [made(info), started(await self._start_container(spec.name, spec.sandbox_id))]

    async def _archive(self, name: str, sandbox_id: str, obj: str) -> tuple[str, Fact]:
        """Stream the workspace into the object store and, only once the stored object is whole and
        its digest is the one computed on the way, remove the container and the volume. Sent again
        after the volume is gone (a worker killed after the removal), the stored object answers."""
        store = await workspaces(self.js, self.replicas)
        if await self._patiently(self.driver.workspace, name, sandbox_id):
            there = await self._run(self.driver.inspect, name, sandbox_id)
            if there is not None and there.running:
                raise DriverError(
                    "archive", f"the container of {name} runs (started outside sandboxctl): stop it first"
                )
            if there is None:
                # The engines read a volume through a container: one removed while the volume stayed
                # (an archive cut short between the two removals, or a removal made outside) is made
                # again, not started, from what the log recorded.
                spec = await self._recorded(name, sandbox_id)
                if spec is None:
                    raise DriverError("archive", f"sandbox {name} has no record in the log to read its workspace by")
                await self._patiently(self.driver.create, spec)
            digest, size = await self._store(store, name, sandbox_id, obj)
            stored = await store.get_info(obj)
            if stored.digest != digest or stored.size != size:
                raise DriverError(
                    "archive", f"the stored archive of {name} is not what was sent ({stored.digest}, not {digest})"
                )
            held = await chunks_stored(self.js, stored.nuid or "")
            if held != stored.chunks:
                raise DriverError(
                    "archive", f"the store holds {held} of the {stored.chunks} chunks of {name}'s archive"
                )
            left = await self._run(self.driver.inspect, name, sandbox_id)
            if left is not None:
                self._replaced.add(left.container_id)  # its removal is the archive's, not news
            await self._patiently(self.driver.delete, name, sandbox_id)
        else:
            try:
                stored = await store.get_info(obj)
            except NotFoundError:
                raise DriverError(
                    "archive", f"the workspace volume {volume_name(name)} is gone and no archive of it is stored"
                ) from None
            digest, size = stored.digest or "", stored.size or 0
        try:
            purged = await purge_orphan_chunks(self.js, ORPHAN_CHUNKS_AGE)
            if purged:
                log.info("%s: purged the chunks of %d archives never finished", self.consumer, len(purged))
        except Exception as exc:  # space, not data: the next archive tries again
            reraise_if_cancelling()
            log.warning("%s: the unfinished archives' chunks were not purged: %r", self.consumer, exc)
        return (
            f"{obj}:archived",
            WorkspaceArchived(sandbox_id=sandbox_id, object=obj, digest=digest, size=size),
        )

    async def _store(self, store: ObjectStore, name: str, sandbox_id: str, obj: str) -> tuple[str, int]:
        """Put the workspace's archive in the store as it streams out of the engine, through a pipe
        (nats-py reads its source through a thread); its SHA-256 and size as sent."""
        read_fd, write_fd = os.pipe()
        digest = hashlib.sha256()
        size = 0

        def pump() -> None:
            nonlocal size
            last = b""
            with os.fdopen(write_fd, "wb") as pipe:
                for chunk in self.driver.copy_out(name, sandbox_id, f"{WORKSPACE}/."):
                    digest.update(chunk)
                    size += len(chunk)
                    last = (last + chunk)[-1024:]
                    pipe.write(chunk)
            if last != bytes(1024):  # a tar archive ends with two zero blocks: without them, it was cut
                raise DriverError("archive", f"the engine's archive of {name}'s workspace ended early")

        pumping = asyncio.ensure_future(self._run(pump))
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as source:
                put = await store.put(obj, source)  # type: ignore[arg-type]
        except BaseException:
            # The pipe's reader is closed: the pump ends at its next write; its error is this one's.
            pumping.add_done_callback(lambda task: task.cancelled() or task.exception())
            raise
        try:
            await pumping
        except BaseException:
            # What the store took of an archive cut short is not an archive: nothing may restore it.
            # Only this put's object is dropped (by its chunks' nuid), never one stored since.
            with contextlib.suppress(Exception):
                if (await store.get_info(obj)).nuid == put.nuid:
                    await store.delete(obj)
            raise
        return "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode(), size

    async def _restore(self, name: str, sandbox_id: str, obj: str) -> Facts:
        """Make the container on a new workspace, unpack the archived object into it as it streams
        from the store (whose digest nats-py checks at the end), start it, then drop the object.
        What an earlier, unfinished restore left (a container, a part of the files) is removed
        first: the object stays until a restore has finished, so it can always be done again.
        An order that comes again after its restore was done (the object dropped, the container
        made from it) only starts that container: its files are the restored ones."""
        store = await workspaces(self.js, self.replicas)
        try:
            stored = await store.get_info(obj)
        except NotFoundError:
            done = await self._run(self.driver.inspect, name, sandbox_id)
            if done is None:
                raise DriverError(
                    "start",
                    f"sandbox {name} is archived as {obj}, but neither that object nor a restored container is there",
                ) from None
            return [started(await self._start_container(name, sandbox_id))]
        held = await chunks_stored(self.js, stored.nuid or "")
        if held != stored.chunks:  # nats-py would wait for ever for the chunks that are not there
            raise DriverError("start", f"the store holds {held} of the {stored.chunks} chunks of {name}'s archive")
        spec = await self._recorded(name, sandbox_id)
        if spec is None:
            raise DriverError("start", f"sandbox {name} is archived but the log has no record of it")
        log.info("%s: restoring %s from the archive %s", self.consumer, name, obj)
        left = await self._run(self.driver.inspect, name, sandbox_id)
        if left is not None:
            self._replaced.add(left.container_id)  # its removal is this restore's, not news
        await self._patiently(self.driver.delete, name, sandbox_id)
        info = await self._patiently(self.driver.create, spec)
        read_fd, write_fd = os.pipe()

        def unpack() -> None:
            # The read end is this thread's: however copy_in ends, it is closed, so the writer
            # below never blocks on a pipe nobody reads.
            with os.fdopen(read_fd, "rb") as pipe:
                self.driver.copy_in(name, sandbox_id, WORKSPACE, iter(lambda: pipe.read(256 * 1024), b""))

        unpacking = asyncio.ensure_future(self._run(unpack))
        try:
            with os.fdopen(write_fd, "wb") as sink:
                await store.get(obj, writeinto=sink)
        except BrokenPipeError:
            await unpacking  # the engine stopped reading: its error says why
            raise
        except BaseException:
            unpacking.add_done_callback(lambda task: task.cancelled() or task.exception())
            raise
        await unpacking
        # Dropped before the start: from here "no object" means "the container holds the whole
        # restore", so an order that comes again (even once the sandbox is Ready and in use) only
        # starts it, and never unpacks the archive over newer files.
        await store.delete(obj)
        return [made(info), started(await self._start_container(name, sandbox_id))]

    async def _start_container(
        self, name: str, sandbox_id: str, launched: Callable[[], None] | None = None
    ) -> ContainerInfo:
        info: ContainerInfo = await self._patiently(
            self.driver.start,
            name,
            sandbox_id,
            done=lambda i: i.running and not i.stopping,
            launched=launched,
        )
        return info

    async def _start(self, name: str, sandbox_id: str, resources: Resources | None = None) -> Facts:
        """Start the sandbox's container; if it is gone but the workspace is not, make it again.
        With ``resources`` (the log says they changed since the container was made), a container
        made with other limits is made again with them first, on the same workspace; a start
        without costs no look at the container."""
        try:
            if resources is not None:
                info = await self._patiently(self.driver.inspect, name, sandbox_id)
                if info is not None and not made_with(info.resources, resources):
                    spec = await self._recorded(name, sandbox_id)
                    if spec is None:
                        raise DriverError(
                            "start", f"sandbox {name} has no record in the log to make its container from"
                        )
                    log.info("%s: %s: making the container again with its new resources", self.consumer, name)
                    self._replaced.add(info.container_id)  # its removal is this start's, not news
                    return await self._make(spec, again=True)
            return [started(await self._start_container(name, sandbox_id))]
        except ContainerMissing:
            return await self._remake(name, sandbox_id)

    async def _stop(self, name: str, sandbox_id: str, timeout: float) -> ContainerInfo:
        self._stops_in_engine[name] = self._stops_in_engine.get(name, 0) + 1
        try:
            info: ContainerInfo = await self._patiently(
                self.driver.stop, name, sandbox_id, timeout, done=lambda i: not i.running
            )
            return info
        finally:
            left = self._stops_in_engine.pop(name, 1) - 1
            if left > 0:
                self._stops_in_engine[name] = left

    async def _remake(self, name: str, sandbox_id: str) -> Facts:
        """The container was removed outside sandboxctl while its workspace volume stayed: make it
        again from the image and settings the log recorded at create, on the same workspace, and
        start it. Without the workspace there is nothing left to start: say so plainly."""
        if not await self._patiently(self.driver.workspace, name, sandbox_id):
            store = await workspaces(self.js, self.replicas)
            obj = subjects.workspace_object(name, sandbox_id)
            try:
                await store.get_info(obj)
            except NotFoundError:
                pass
            else:
                return await self._restore(name, sandbox_id, obj)
            raise DriverError(
                "start",
                f"the container {container_name(name)} and the workspace volume {volume_name(name)} are both gone: "
                f"the sandbox's files are lost, and it can only be deleted (sandboxctl delete {name})",
            )
        spec = await self._recorded(name, sandbox_id)
        if spec is None:
            raise DriverError("start", f"the container {container_name(name)} is gone and the log has no record of it")
        log.warning(
            "%s: %s has no container but its workspace is intact; making the container again", self.consumer, name
        )
        return await self._make(spec)

    async def _recorded(self, name: str, sandbox_id: str) -> SandboxSpec | None:
        """The sandbox's spec as the log has it now (read only on the rare paths that make a container again)."""
        created = await recorded_spec(self.js, name, sandbox_id)
        return None if created is None else spec_of(name, created)

    async def _patiently(
        self,
        operation: Callable[..., Any],
        *args: Any,
        done: Callable[[ContainerInfo], bool] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``operation(*args, **kwargs)`` on the engine, riding out an engine that took the request and stopped
        answering (paused, overloaded): a read timeout is no failure yet, since the engine may still
        carry the request out. The order stays in hand (kept alive) while the sandbox's container is
        looked at again with backoff until the engine answers; then what it shows is the outcome if
        ``done`` says the work is done (a stop: exited), else the operation runs again (every
        operation is idempotent). Up to ENGINE_PATIENCE seconds, then EngineTimeout (a work order
        reports it as DriverFailed); an engine that refuses connections fails at once, as before."""
        deadline = time.monotonic() + ENGINE_PATIENCE
        name, sandbox_id = (args[0].name, args[0].sandbox_id) if isinstance(args[0], SandboxSpec) else args[:2]
        while True:
            reraise_if_cancelling()
            try:
                return await self._run(operation, *args, **kwargs)
            except EngineTimeout as exc:
                timeout = exc
            log.warning(
                "%s: %s of %s: the engine did not answer (%s); waiting for it",
                self.consumer,
                timeout.operation,
                name,
                timeout.message,
            )
            wait = ENGINE_BACKOFF[0]
            while True:
                if time.monotonic() + wait > deadline:
                    raise EngineTimeout(
                        timeout.operation,
                        f"{timeout.message} (the engine has not answered for {ENGINE_PATIENCE:g}s)",
                    )
                await asyncio.sleep(wait)
                wait = min(wait * 2, ENGINE_BACKOFF[1])
                try:
                    info = await self._run(self.driver.inspect, name, sandbox_id)
                    break
                except EngineTimeout:
                    continue
            if done is not None and info is not None and done(info):
                return info

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
        await publish_fact(self.js, envelope, self.host)

    # -- the engine's side: boot reconciliation and changes made outside --------

    async def reconcile(self) -> None:
        """Compare the log's phases with the engine's containers and settle every difference.

        Runs whenever the engine's event stream (re)connects, so a worker that
        starts, or an engine that comes back, leaves no sandbox stuck in a
        transient phase and no phase that disagrees with the engine.
        """
        states = await load_states(self.js)
        containers = await self._run(self.driver.list_managed)
        by_name: dict[str, list[ContainerInfo]] = {}
        for info in containers:
            by_name.setdefault(info.sandbox, []).append(info)
        for name, state in states.items():
            infos = by_name.pop(name, [])
            if state.phase is Phase.DELETED and not infos:
                continue
            async with self._lock(name):
                # The snapshot and the listing took time: if the log has moved on for this name
                # (a delete completed, the name created again), acting on the old phase would
                # hit the new sandbox's container. The move's own work order settles it.
                if await last_subject_seq(self.js, name) != state.seq:
                    continue
                ours = self._mine(state)
                mine = [i for i in infos if i.sandbox_id == state.sandbox_id and ours]
                for info in infos:
                    if info.sandbox_id == state.sandbox_id and state.driver == self.driver.name and not ours:
                        continue  # the sandbox's, though placed on another host: that host's to settle
                    if info not in mine:
                        await self._orphan(info, f"it belongs to no live sandbox {name} on {self.driver.name}")
                if not ours:
                    continue
                if state.phase is Phase.DELETED:
                    for info in mine:
                        await self._orphan(info, f"sandbox {name} is Deleted")
                    continue
                facts = await self._settle(state, mine[0] if mine else None)
                # Keyed by the log position it was decided at: a fact the engine reported
                # long ago (this run's start) may be the news now, after a failure in between.
                for index, (_, fact) in enumerate(facts):
                    await self.report(name, f"{state.sandbox_id}:{state.seq}:reconcile:{index}", fact)
        for name, infos in by_name.items():
            if await last_subject_seq(self.js, name):
                continue  # created since the snapshot: not an orphan
            for info in infos:
                await self._orphan(info, "no sandbox of that name is in the log")
        self.reconciliations += 1
        log.info("%s: reconciled %d sandboxes with %d containers", self.consumer, len(states), len(containers))

    async def _settle(self, state: SandboxState, info: ContainerInfo | None) -> Facts:
        name, phase, sandbox_id = state.name, state.phase, state.sandbox_id
        fact_id = f"{sandbox_id}:{state.seq}:reconcile"
        try:
            if phase is Phase.DELETING:
                container_id = await self._patiently(self.driver.delete, name, sandbox_id)
                return [removed(container_id, sandbox_id, fact_id, workspace=True)]
            if phase is Phase.STARTING and state.archive:
                # A restore not seen to its end: what it left is not the workspace, so it is never
                # started from here. Its start order, not yet acknowledged, comes again and restores
                # from the archive (a sweep does not hold up the engine's events for a long copy).
                return []
            if info is None:
                if phase is Phase.STARTING:
                    return await self._remake(name, sandbox_id)  # removed outside while it was being started
                # A missing container while Provisioning is the create work order's to make.
                return [] if phase is Phase.PROVISIONING else [removed("", sandbox_id, fact_id)]
            if phase is Phase.STOPPING:
                # Alive (a stop still in its grace counts: podman's "stopping"): complete the stop
                # with what is left of the grace asked for, and report it once the process is gone.
                if info.running:
                    info = await self._stop(name, sandbox_id, _grace_left(state))
                return [exited(info, requested=True)] if not info.running else []
            if phase in (Phase.PAUSING, Phase.PAUSED, Phase.RESUMING) and not info.running:
                return [exited(info, requested=False)]  # ended from outside while frozen
            if phase is Phase.PAUSING:
                if not info.paused:
                    info = await self._patiently(self.driver.pause, name, sandbox_id, done=lambda i: i.paused)
                return [frozen(info)]
            if phase is Phase.RESUMING:
                if info.paused:
                    info = await self._patiently(
                        self.driver.resume, name, sandbox_id, done=lambda i: i.running and not i.paused
                    )
                return [thawed(info)]
            if phase is Phase.PAUSED:
                return [] if info.paused else [thawed(info)]  # thawed outside sandboxctl: Ready
            if phase is Phase.READY and info.paused:
                return [frozen(info)]  # paused outside sandboxctl
            if phase in (Phase.STARTING, Phase.PROVISIONING):
                if info.stopping:  # a stop from before the start request is still under way: end it first
                    info = await self._stop(name, sandbox_id, _grace_left(state))
                if not info.running:
                    info = await self._start_container(name, sandbox_id)
                return [started(info)]
            if info.stopping:
                return []  # its exit, once the stop is done, is reported then (watcher or next sweep)
            if phase is Phase.READY and not info.running:
                if info.exit_code == 0 and not info.oom:
                    return [exited(info, requested=False)]  # a job that ran to its end: Completed
                if not self.restart_exited:
                    return [exited(info, requested=False)]
                log.warning(
                    "%s: %s exited (code %d) while unobserved; restarting it", self.consumer, name, info.exit_code
                )
                return [started(await self._start_container(name, sandbox_id))]
            if phase is Phase.ERROR and not info.running and state.failed_operation == "stop":
                return [exited(info, requested=True)]  # the stop that failed for us was done after all
            # Ready, Stopped or Error: a running container is the truth (a start made outside).
            return [started(info)] if info.running else []
        except ContainerMissing:
            return [removed("", sandbox_id, fact_id)]
        except EngineTimeout:
            raise  # an engine that stays silent ends the sweep; it runs again when the engine's stream reconnects
        except DriverError as exc:
            return [failed(exc, sandbox_id, fact_id)]

    async def _orphan(self, info: ContainerInfo, reason: str) -> None:
        if not self._nameable(info.sandbox, info.container_id):
            return
        log.warning(
            "%s: orphan container %s (sandbox label %r): %s; left in place",
            self.consumer,
            info.container_id[:12],
            info.sandbox,
            reason,
        )
        fact = ContainerOrphaned(container_id=info.container_id, sandbox_id=info.sandbox_id, reason=reason)
        await self.report(info.sandbox, f"{info.container_id}:orphaned", fact)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent | Exception | _Connected] = asyncio.Queue()

        def put(item: EngineEvent | Exception | _Connected) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                while not self._stopping.is_set():
                    try:
                        since = time.time()
                        self.driver.ping()
                        put(CONNECTED)  # the stream replays from `since`, so the sweep misses nothing
                        for event in self.driver.events(since=since):
                            if self._stopping.is_set():
                                return
                            put(event)
                    except Exception as exc:
                        if self._stopping.is_set():
                            return
                        put(exc)
                    self._stopping.wait(self.retry_wait)
            except RuntimeError:
                return  # the event loop has closed under us

        threading.Thread(target=pump, name=f"{self.consumer}-events", daemon=True).start()
        lost = False
        while True:
            reraise_if_cancelling()
            item = await queue.get()
            if isinstance(item, _Connected):
                if lost:
                    log.warning("%s: engine event stream is back; reconciling", self.consumer)
                lost = False
                try:
                    await self._until_stored("reconciliation", self.reconcile)
                except Exception:
                    reraise_if_cancelling()
                    log.exception("%s: reconciliation failed; it runs again when the stream reconnects", self.consumer)
            elif isinstance(item, Exception):
                if not lost:
                    log.warning("%s: engine event stream lost: %s; reconnecting", self.consumer, item)
                lost = True
            else:
                try:
                    await self._until_stored(f"the report of {item}", functools.partial(self.observe, item))
                except DriverError as exc:  # the engine went away mid-event; the next sweep settles it
                    log.warning("%s: could not inspect after %s: %s", self.consumer, item, exc)
                except Exception:
                    reraise_if_cancelling()
                    log.exception("%s: could not report %s", self.consumer, item)

    async def _until_stored(self, what: str, report: Callable[[], Awaitable[None]]) -> None:
        """Run ``report`` until the bus takes its facts: an observation is the only news of what
        happened in the engine, so a bus that cannot store for now (bus.publish.cannot_store) is
        waited out, in order, never skipped. Any other failure is raised."""
        delay = 0.2
        while True:
            reraise_if_cancelling()
            try:
                await report()
                return
            except Exception as exc:
                reraise_if_cancelling()
                if not cannot_store(exc):
                    raise
                log.warning("%s: %s waits for the bus, which cannot take it for now: %r", self.consumer, what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _nameable(self, name: str, container_id: str) -> bool:
        """Whether a container's sandbox label is a sandbox name at all. The label is the engine's
        word, which anyone may write: one that is no name (a dot, a wildcard, too long) could be no
        subject of the facts stream, and its report would wait for ever for a bus that is fine."""
        why = validate_name(name)
        if why is not None:
            log.warning("%s: container %s ignored: its sandbox label is no sandbox's: %s", self.consumer,
                        container_id[:12], why)  # fmt: skip
        return why is None

    async def observe(self, event: EngineEvent) -> None:
        if not self._nameable(event.sandbox, event.container_id):
            return
        if event.action == "remove" and event.container_id in self._replaced:
            self._replaced.discard(event.container_id)  # made again by a start with new resources
            return
        if event.action == "remove":
            fact_id, fact = removed(event.container_id, event.sandbox_id, event.container_id)
            await self.report(event.sandbox, fact_id, fact)
            return
        info = await self._run(self.driver.inspect, event.sandbox, event.sandbox_id)
        if info is None or info.container_id != event.container_id:
            return  # gone already; its removal is reported on its own
        if event.action == "die" and not info.running:
            fact_id, fact = exited(info, requested=False)
        elif event.action == "start" and info.running:
            fact_id, fact = started(info)
        elif event.action == "pause" and info.paused:
            fact_id, fact = frozen(info, event.time_ns)
        elif event.action == "unpause" and info.running and not info.paused:
            fact_id, fact = thawed(info, event.time_ns)
        else:
            return  # the container changed again since; the later event reports it
        await self.report(event.sandbox, fact_id, fact)


def _grace_left(state: SandboxState) -> float:
    """What is left of the grace the sandbox's stop asked for (the log records when it ends),
    or STOP_GRACE where the log does not say."""
    return max(0.0, state.stop_by - time.time()) if state.stop_by else STOP_GRACE
