"""The state-machine service: the only writer of lifecycle events.

It keeps every sandbox's state in memory, folded from the log by a Tail that
starts at sequence 1, so a restarted service recovers by reading the log and
nothing else; a long log is read at start by a reader process of its own
(services/bulkread.py), so reading and folding use both cores. Commands
arrive by request/reply; driver facts arrive through a durable consumer and
are acknowledged only after the events they cause are in the log. Each append
is guarded by the sandbox's last sequence; a conflict means another writer got
there first, so the service waits until its cache has seen that write and
decides again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events import subjects
from events.commands import CreateSandbox, SandboxCommand, command_decoder
from events.envelope import Envelope, encode, now, type_name
from events.lifecycle import LifecycleEvent
from events.replies import ErrorCode, Reply, error_reply
from services.auth import Authorizer, check, ensure_audit_stream, record_denied
from services.bulkread import BULK_BEHIND, Frames
from services.log import (
    MAX_DELIVER,
    Conflict,
    DecodeError,
    append,
    dead_letter,
    decode_event,
    decode_fact,
    ensure_streams,
    last_subject_seq,
    retry_delay,
)
from services.pull import Pull
from services.tail import Tail, deliveries, reraise_if_cancelling, stream_seq, unsubscribe
from statemachine import Rejection, SandboxState, decide, evolve, react, validate_name
from statemachine.deadlines import Deadlines, overdue
from statemachine.machine import IllegalTransition
from statemachine.phases import TRANSIENT

log = logging.getLogger(__name__)

SOURCE = "sandboxctl/statemachine"
MAX_ATTEMPTS = 8
FACTS_CONSUMER = "sandboxctl-statemachine"


class StateMachineService:
    def __init__(
        self,
        nc: NATS,
        drivers: tuple[str, ...] = ("podman",),
        default_driver: str = "podman",
        max_in_flight: int = 4096,
        deadlines: Deadlines | None = None,
        watchdog_interval: float = 1.0,
        replicas: int = 1,
        authorizer: Authorizer | None = None,
        idle_timeout: float = 0.0,
        bulk_behind: int = BULK_BEHIND,
    ) -> None:
        self.replicas = replicas
        self.bulk_behind = bulk_behind
        self.idle_timeout = idle_timeout  # a create's idle_timeout when it names none (0: never auto-stopped)
        # With an authorizer, commands come on sandboxctl.cmd.<verb>.<user> and need the user's role.
        self.authorizer = authorizer
        self.nc = nc
        self.js = nc.jetstream()
        self.drivers = drivers
        self.default_driver = default_driver
        self.states: dict[str, SandboxState] = {}
        self.deadlines: Deadlines = deadlines or {}
        self.watchdog_interval = watchdog_interval
        self._transient: set[str] = set()  # names in a phase with a deadline: all the watchdog looks at
        self.position = 0  # highest log sequence folded into self.states
        self.tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._caught_up = asyncio.Event()
        self._subs: list[object] = []

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await ensure_streams(self.js, self.replicas)
        if self.authorizer is not None:
            await ensure_audit_stream(self.js, self.replicas)
        self._tail = Tail(self.js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=1)
        self.tasks.append(asyncio.create_task(self._follow_log(), name="statemachine-log"))
        await self._caught_up.wait()
        self._subs.append(
            await self.nc.subscribe(subjects.COMMANDS_ALL, queue="sandboxctl-statemachine", cb=self._on_command)
        )
        self.tasks.append(asyncio.create_task(self._consume_facts(), name="statemachine-facts"))
        self.tasks.append(asyncio.create_task(self._watchdog(), name="statemachine-watchdog"))
        log.info("state machine ready: %d sandboxes folded up to seq %d", len(self.states), self.position)

    async def stop(self) -> None:
        for sub in self._subs:
            await unsubscribe(sub)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=5)
        await self._tail.close()

    # -- the log -----------------------------------------------------------------

    async def _follow_log(self) -> None:
        target = await self._tail.last_seq()
        if target - self.position >= self.bulk_behind:
            await self._catch_up(target)
            self._tail.next_seq = self.position + 1
        if self._tail.next_seq > target:
            self._caught_up.set()  # nothing to read: do not wait out an idle fetch
        async for batch in self._tail.batches():
            for msg in batch:
                seq = stream_seq(msg)
                # Most of the log is this instance's own appends, folded when they were
                # acknowledged: skip decoding them (a fifth of its CPU under load).
                if not self._applied(subjects.name_of(msg.subject), seq):
                    self._fold_logged(msg.data, seq)
                self.position = seq
            if self._tail.next_seq > target:
                self._caught_up.set()

    async def _catch_up(self, target: int) -> None:
        """Fold the log up to ``target`` from a reader process. Commands wait for it (the
        service is not ready until it is caught up), so a restart on a long log is as
        short as reading it; a reader that fails leaves the rest to the Tail."""
        reader = Frames(self.nc, subjects.LOG_STREAM, subjects.LOG_ALL, self.position + 1, target)
        async with reader:
            async for last, payloads in reader:
                for seq, data in enumerate(payloads, last - len(payloads) + 1):
                    self._fold_logged(data, seq)
                self.position = last
        if self.position < target:
            log.warning(
                "state machine: catch-up reader stopped at %d of %d (%s); reading on",
                self.position,
                target,
                reader.error,
            )

    def _fold_logged(self, data: bytes, seq: int) -> None:
        try:
            self._fold(decode_event(data), seq)
        except (*DecodeError, IllegalTransition) as exc:
            log.error("log seq %d cannot be folded: %s", seq, exc)

    def _applied(self, name: str, seq: int) -> bool:
        """Whether the cache already holds log position ``seq`` of ``name``: our own appends are
        folded on their ack and come back through the log, in either order."""
        state = self.states.get(name)
        return state is not None and state.seq >= seq

    def _fold(self, envelope: Envelope, seq: int) -> None:
        if self._applied(envelope.subject, seq):
            return
        state = self.states[envelope.subject] = evolve(self.states.get(envelope.subject), envelope, seq)
        if state.phase in TRANSIENT:
            self._transient.add(envelope.subject)
        else:
            self._transient.discard(envelope.subject)

    async def _wait_for(self, name: str, seq: int, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.position < seq and (self.states.get(name) is None or self.states[name].seq < seq):
            if loop.time() > deadline:
                raise TimeoutError(f"log reader did not reach seq {seq}")
            await asyncio.sleep(0.002)

    # -- the one decide-and-append loop ------------------------------------------

    async def _decide_and_append(
        self,
        name: str,
        decide_fn: Callable[[SandboxState | None], list[LifecycleEvent] | Rejection],
        cause_id: str,
        actor: str,
        correlation_id: str,
    ) -> Reply:
        for _ in range(MAX_ATTEMPTS):
            state = self.states.get(name)
            decision = decide_fn(state)
            if isinstance(decision, Rejection) or not decision:
                # An append is checked by the log itself; a refusal or a no-op
                # is not, so make sure it was not decided on a stale cache.
                latest = await last_subject_seq(self.js, name)
                if latest > (state.seq if state else 0):
                    await self._wait_for(name, latest)
                    continue
                if isinstance(decision, Rejection):
                    return error_reply(decision.code, decision.message, name)
                return self._accepted(name, state, 0)
            expected = state.seq if state else 0
            try:
                for index, event in enumerate(decision):
                    envelope = Envelope(
                        id=f"{cause_id}:{index}",
                        type=type_name(type(event)),
                        source=SOURCE,
                        subject=name,
                        time=now(),
                        data=event,
                        actor=actor,
                        correlationid=correlation_id or cause_id,
                        causationid=cause_id,
                    )
                    ack = await append(self.js, envelope, expected)
                    if ack.duplicate:
                        # Stored before, by us or a twin; the cache learns it from the log.
                        await self._wait_for(name, ack.seq)
                    else:
                        self._fold(envelope, ack.seq)
                    expected = ack.seq
            except Conflict:
                await self._wait_for(name, await last_subject_seq(self.js, name))
                continue
            return self._accepted(name, self.states.get(name), len(decision))
        return error_reply(ErrorCode.CONFLICT, f"sandbox {name} kept changing; try again", name)

    @staticmethod
    def _accepted(name: str, state: SandboxState | None, appended: int) -> Reply:
        return Reply(
            accepted=True,
            sandbox=name,
            phase=state.phase.value if state else "",
            seq=state.seq if state else 0,
            appended=appended,
        )

    # -- commands ----------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._handle_command(msg))
        self._inflight.add(task)
        task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _handle_command(self, msg: Msg) -> None:
        try:
            reply = await self.handle(msg.subject, msg.data)
        except Exception as exc:  # never let one command take the service down
            log.exception("command on %s failed", msg.subject)
            reply = error_reply(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except Exception:
                log.warning("could not reply on %s", msg.reply)

    async def handle(self, subject: str, payload: bytes) -> Reply:
        try:
            command: SandboxCommand = command_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error_reply(ErrorCode.INVALID_ARGUMENT, f"malformed command: {exc}")
        verb = subject.split(".")[2] if self.authorizer is not None else subject.rsplit(".", 1)[-1]
        if verb != command.VERB:
            return error_reply(
                ErrorCode.INVALID_ARGUMENT,
                f"a {command.VERB} command was sent to {subject}; send it to {subjects.command(command.VERB)}",
                command.name,
            )
        problem = validate_name(command.name)
        if problem:
            # Before anything looks the name up: it is used as a subject token, and "*" or ">" would match others.
            return error_reply(ErrorCode.INVALID_ARGUMENT, problem)
        if self.authorizer is not None:
            denied = check(self.authorizer, subject, command)
            if denied is not None:
                # Recorded before it is answered, and only there: the log holds what happened.
                await record_denied(self.js, denied)
                return error_reply(ErrorCode.PERMISSION_DENIED, denied.reason, command.name)
            # The subject's user token is who sent it (only that user may publish there); the payload's claim is not.
            command = msgspec.structs.replace(command, actor=subject.split(".")[3])
        if not command.command_id:
            return error_reply(ErrorCode.INVALID_ARGUMENT, "command_id must not be empty", command.name)
        if isinstance(command, CreateSandbox) and not command.driver:
            command = msgspec.structs.replace(command, driver=self.default_driver)
        if isinstance(command, CreateSandbox) and command.idle_timeout is None:
            command = msgspec.structs.replace(command, idle_timeout=self.idle_timeout)
        return await self._decide_and_append(
            command.name,
            lambda state: decide(state, command, self.drivers, time.time()),
            command.command_id,
            command.actor,
            command.correlation_id,
        )

    # -- deadlines -----------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog_interval)
            now_ = time.time()
            for name in list(self._transient):
                state = self.states.get(name)
                if not overdue(state, now_, self.deadlines):
                    continue
                assert state is not None
                log.warning("%s overstayed %s; failing it with reason timeout", name, state.phase.value)
                try:
                    await self._decide_and_append(
                        name,
                        lambda current, now_=now_: overdue(current, now_, self.deadlines),
                        f"{state.sandbox_id}:{state.seq}:timeout",
                        "sandboxctl/watchdog",
                        "",
                    )
                except Exception:
                    reraise_if_cancelling()
                    log.exception("watchdog could not fail %s", name)

    # -- facts -------------------------------------------------------------------

    async def _consume_facts(self) -> None:
        config = ConsumerConfig(
            durable_name=FACTS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=10_000,
            max_deliver=MAX_DELIVER,
            filter_subject=subjects.FACTS_ALL,
        )
        pull = Pull(self.js, subjects.FACTS_STREAM, config)
        try:
            async for msgs in pull.batches():
                if not msgs:
                    continue
                try:
                    await self._apply_facts(msgs)
                except Exception:  # what was not acknowledged comes again after the ack wait
                    reraise_if_cancelling()
                    log.exception("facts consumer: applying %d facts failed", len(msgs))
                    await asyncio.sleep(0.25)
        finally:
            await pull.close()

    async def _apply_facts(self, msgs: list[Msg]) -> None:
        # Facts of one sandbox are applied in order; different sandboxes in parallel.
        by_name: dict[str, list[Msg]] = {}
        for msg in msgs:
            by_name.setdefault(subjects.name_of(msg.subject), []).append(msg)
        await asyncio.gather(*(self._apply_sandbox_facts(batch) for batch in by_name.values()))

    async def _apply_sandbox_facts(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                envelope = decode_fact(msg.data)
            except DecodeError as exc:
                log.error("dead-lettering malformed fact on %s: %s", msg.subject, exc)
                await dead_letter(self.js, FACTS_CONSUMER, msg, f"unreadable fact: {exc}")
                continue
            fact = envelope.data
            reply = await self._decide_and_append(
                envelope.subject,
                lambda state, fact=fact: react(state, fact),
                envelope.id,
                envelope.actor or envelope.source,
                envelope.correlationid,
            )
            if reply.error is not None and reply.error.code in (ErrorCode.CONFLICT, ErrorCode.INTERNAL):
                delivered = deliveries(msg)
                if delivered >= MAX_DELIVER:
                    await dead_letter(self.js, FACTS_CONSUMER, msg, f"{reply.error.code}: {reply.error.message}")
                else:
                    await msg.nak(delay=retry_delay(delivered))
                continue
            await msg.ack()
