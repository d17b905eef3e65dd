"""The state-machine service: the only writer of lifecycle events.

It keeps every sandbox's state in memory, folded from the log by a Tail that
starts at sequence 1, so a restarted service recovers by reading the log and
nothing else; a long log is read at start by a reader process of its own
(bus/bulkread.py), so reading and folding use both cores. Commands
arrive by request/reply; driver facts arrive through a durable consumer and
are acknowledged only after the events they cause are in the log. Each append
is guarded by the sandbox's last sequence; a conflict means another writer got
there first, so the service waits until its cache has seen that write and
decides again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from sandboxctl.auth import Authorizer, check, record_denied
from sandboxctl.bus import snapshots
from sandboxctl.bus.bulkread import BULK_BEHIND, Frames
from sandboxctl.bus.eventlog import (
    DecodeError,
    Failures,
    SequenceConflict,
    append,
    dead_letter,
    decode_event,
    decode_fact,
    fold_logged,
    last_subject_seq,
    retry_delay,
)
from sandboxctl.bus.hosts import HostsView
from sandboxctl.bus.lease import Lease
from sandboxctl.bus.natsinternals import settle
from sandboxctl.bus.publish import DUPLICATE_IN_PROCESS, RESOURCES_EXHAUSTED, UNREACHABLE, Ack, cannot_store
from sandboxctl.bus.pull import Pull
from sandboxctl.bus.reading import recorded_spec
from sandboxctl.bus.streams import DUPLICATE_WINDOW, MAX_DELIVER, durable_pull, ensure_streams
from sandboxctl.bus.tail import Tail, reraise_if_cancelling, stream_seq, unsubscribe
from sandboxctl.events import subjects
from sandboxctl.events.commands import (
    BulkItem,
    BulkPage,
    BulkSandboxes,
    CloneSandbox,
    CreateSandbox,
    SandboxCommand,
    bulk_decoder,
    command_decoder,
)
from sandboxctl.events.envelope import Envelope, encode, new_id, now, type_name
from sandboxctl.events.facts import Fact
from sandboxctl.events.hosts import HEARTBEAT_DEFAULT
from sandboxctl.events.lifecycle import LifecycleEvent
from sandboxctl.events.limits import SNAPSHOT_EVERY
from sandboxctl.events.replies import ErrorCode, Reply, error_reply
from sandboxctl.observe import metrics, tracing
from sandboxctl.statemachine import Phase, Rejection, SandboxState, decide, evolve, react, validate_name
from sandboxctl.statemachine.bulk import bulk_problem, command_for, selected
from sandboxctl.statemachine.clone import decide_clone
from sandboxctl.statemachine.deadlines import Deadlines, overdue
from sandboxctl.statemachine.phases import TRANSIENT
from sandboxctl.statemachine.placement import (
    HOST_LOST,
    NO_LIMITS,
    Candidate,
    Loads,
    Placer,
    foreign_report,
    host_lost,
)

log = logging.getLogger(__name__)

SOURCE = "sandboxctl/statemachine"
MAX_ATTEMPTS = 8
BULK_PARALLEL = 64  # sandboxes of one bulk page decided and appended at a time
FACTS_CONSUMER = "sandboxctl-statemachine"
# Facts are applied by one instance at a time, in the order the drivers reported them (two
# instances applying one sandbox's facts at once could apply them out of order): the facts
# consumer is pinned to one instance; the others stand by and take over at once when it stops
# (it gives up its pin), or when it has not asked for facts for FACTS_PIN_TIMEOUT seconds (a
# killed or frozen process).
# Commands go to every instance at once: the sequence guard refuses the loser of a race.
FACTS_GROUP = "statemachine"
FACTS_PIN_TIMEOUT = 1.5
# A fact delivered to an instance that dies before it acknowledges it (delivered in the moment
# before the server knew the instance was gone) comes again to the next pinned instance after
# FACTS_ACK_WAIT; facts in the hands of a live instance are kept alive while it works them (up to
# Pull.MAX_BUSY, after which it is taken to be stuck).
FACTS_ACK_WAIT = 5.0

# The ids of the events a fact or the watchdog causes start with these. A command id cannot hold
# a "/" (events/limits.py), and user names cannot start with "sandboxctl-" (auth/roles.py), so
# no command, whoever sends it, can take the id (and so the Nats-Msg-Id) of another's event.
FACT_EVENTS = "sandboxctl-fact/"
WATCHDOG_EVENTS = "sandboxctl-watchdog/"

# How many accepted commands' outcomes are kept for their retries, and for how long: the log's
# duplicate window, after which a retry is decided again like any command.
OUTCOMES = 16_384
# How long a fact waits before it is tried again when the log could not take its events.
UNAVAILABLE_RETRY = 2.0
# How long a sandbox's later facts are held back behind one not done with, at most: it comes back
# after its retry delay, or has gone to another reader (the pin moved) and will not come here.
HOLD_BACK = 10.0
# How long a command waits for a log that does not answer for now (a cluster electing the log's
# leader after losing a node takes a few seconds) before it is answered ``unavailable``.
APPEND_PATIENCE = 5.0
# How long one attempt waits for the log's ack, and then for its answer to whether the append was
# stored: well under the patience, so that a log whose leader froze (it takes requests and answers
# none until the others elect a new one) is asked again several times within it, and a command is
# answered soon after the election rather than a whole ack timeout later. An ack that is merely
# slow costs a look-up, never a second copy: the append's id is the command's.
ATTEMPT_TIMEOUT = 1.0
SNAPSHOT_CHECK = 5.0  # seconds between looks at whether a snapshot is due (SNAPSHOT_EVERY)
HOSTS_READ = 5.0  # seconds a starting state machine waits to have read the hosts announced


class OutcomeUnknown(Exception):
    """An append whose ack never came, while the log could not be asked whether it landed."""


def _why(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


class Cause(msgspec.Struct, frozen=True):
    """What an append answers. Its events' ids are ``<key>:<index>`` (their Nats-Msg-Id): the
    command id, under its sender's name when users are authenticated, or a fact's or the
    watchdog's id under their own prefix. ``id`` is the causation id the log records."""

    key: str
    id: str
    actor: str
    correlation_id: str = ""
    digest: str = ""  # a command's (command_digest); empty for facts and the watchdog


def command_digest(command: SandboxCommand) -> str:
    """What an idempotency key is bound to: the command as decided (after the service filled in
    its defaults and, with users, the authenticated actor)."""
    return hashlib.sha256(encode(command)).hexdigest()[:32]


class Outcomes:
    """The replies to recent accepted commands, by idempotency key: a retry gets its first outcome
    (the sequence and sandbox it was answered with), and a key used again for another command is
    told apart by the command's digest. Bounded in size and age, so it costs memory in proportion
    to the command rate, not to the number of sandboxes."""

    def __init__(self, size: int = OUTCOMES, ttl: float = DUPLICATE_WINDOW) -> None:
        self.size, self.ttl = size, ttl
        self._kept: OrderedDict[str, tuple[float, str, Reply]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[str, Reply] | None:
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if now - oldest[0] < self.ttl:
                break
            self._kept.popitem(last=False)
        kept = self._kept.get(key)
        return None if kept is None else kept[1:]

    def retried(self, key: str, digest: str, now: float) -> Reply | None:
        """The first outcome of this very command (``digest``) under ``key``, if it is kept: a retry."""
        kept = self.get(key, now)
        return kept[1] if kept is not None and kept[0] == digest else None

    def put(self, key: str, digest: str, reply: Reply, now: float) -> None:
        self._kept[key] = (now, digest, reply)
        self._kept.move_to_end(key)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)


class StateMachineService:
    """The only writer of lifecycle events: decides commands and driver facts against the log.

    Consumes: commands on ``sandboxctl.cmd.<verb>[.<user>]`` (request/reply), driver facts (a
    durable consumer of SANDBOXCTL_FACTS), and the log itself (its cache of every sandbox's
    state). Produces: events appended to SANDBOXCTL_LOG, each guarded by the sandbox's last
    sequence, and one reply per command. Promises: a reply says accepted only for what is in the
    log; an idempotency key is bound to its command; two racing commands never both win; a fact
    is acknowledged only after the events it causes are stored; a restart recovers from the log."""

    def __init__(
        self,
        nc: NATS,
        drivers: tuple[str, ...] = ("podman",),
        default_driver: str = "podman",
        max_in_flight: int = 4096,
        deadlines: Deadlines | None = None,
        watchdog_interval: float = 1.0,
        replicas: int | None = None,
        authorizer: Authorizer | None = None,
        idle_timeout: float = 0.0,
        bulk_behind: int = BULK_BEHIND,
        snapshot_every: int = SNAPSHOT_EVERY,
        snapshot_check: float = SNAPSHOT_CHECK,
        place: bool = False,
    ) -> None:
        self.replicas = replicas
        # Placing: each create goes to a host its driver workers announced (statemachine/placement.py),
        # named in its created event. Without, sandboxes are on no host (a plane with no hosts: tests
        # of the state machine alone, which publish the drivers' facts themselves).
        self.hosts = (
            HostsView(nc.jetstream(), make=True, on_change=self._host_changed, replicas=replicas) if place else None
        )
        self.placer = Placer(self.hosts.live) if self.hosts is not None else None
        self.loads = self.placer.loads if self.placer is not None else Loads()
        self._started = time.monotonic()
        self.snapshot_every = snapshot_every
        self.snapshot_check = snapshot_check
        self.bulk_behind = bulk_behind
        self.idle_timeout = idle_timeout  # a create's idle_timeout when it names none (0: never auto-stopped)
        # With an authorizer, commands come on sandboxctl.cmd.<verb>.<user> and need the user's role.
        self.authorizer = authorizer
        self.nc = nc
        self.js = nc.jetstream()
        self._lookup = nc.jetstream(timeout=ATTEMPT_TIMEOUT)  # whether an unconfirmed append was stored
        self.drivers = drivers
        self.default_driver = default_driver
        self.states: dict[str, SandboxState] = {}
        # Names whose log holds entries but no sandbox (every entry was skipped, see
        # bus.eventlog.fold_logged), with the last such entry's sequence: what an append expects.
        self._skipped: dict[str, int] = {}
        self._outcomes = Outcomes()
        self.deadlines: Deadlines = deadlines or {}
        self.watchdog_interval = watchdog_interval
        self._transient: set[str] = set()  # names in a phase with a deadline: all the watchdog looks at
        self.position = 0  # highest log sequence folded into self.states
        self.tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._caught_up = asyncio.Event()
        self._subs: list[object] = []
        self._facts: Pull | None = None
        # Appends the log refused because another writer (another instance) had appended to the
        # sandbox first: each is decided again on the state that includes the other's write.
        self.conflicts = 0
        self.facts_applied = 0
        self._failures = Failures()  # each fact's own failures, before it is dead-lettered
        # Per sandbox, the stream sequence of a fact not done with and until when its sandbox's
        # later facts are held back behind it (see _apply_sandbox_facts).
        self._held_back: dict[str, tuple[int, float]] = {}
        self.snapshot_at = 0  # the log position of the last snapshot this instance read or wrote
        self._subject_at = ""  # the log subject of the entry at self.position
        self._log_created = ""
        self.snapshot_lease = Lease(self.js, subjects.SNAPSHOT_LEASE, f"statemachine-{new_id()}")

    @property
    def counters(self) -> dict[str, int]:
        """What its health report counts (events.health.ServiceHealth.counters)."""
        return {
            "conflicts": self.conflicts,
            "facts_applied": self.facts_applied,
            "applies_facts": int(self.applies_facts),
            "snapshot_at": self.snapshot_at,
        }

    @property
    def consumers(self) -> tuple[tuple[str, str], ...]:
        """(stream, durable) of the JetStream consumer this service works, for its backlog's gauges."""
        return ((subjects.FACTS_STREAM, FACTS_CONSUMER),)

    @property
    def applies_facts(self) -> bool:
        """Whether this instance holds the facts consumer's pin (of several, one applies facts)."""
        return self._facts is not None and bool(self._facts.pin)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await ensure_streams(self.js, self.replicas, audit=self.authorizer is not None, owner=True)
        await self._restore_snapshot()
        self._tail = Tail(self.js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=self.position + 1)
        self.tasks.append(asyncio.create_task(self._follow_log(), name="statemachine-log"))
        await self._caught_up.wait()
        if self.hosts is not None:
            self.tasks.append(asyncio.create_task(self.hosts.run(), name="statemachine-hosts"))
            try:  # the hosts announced so far, before the first create is placed
                await asyncio.wait_for(self.hosts.ready.wait(), HOSTS_READ)
            except TimeoutError:
                log.warning(
                    "state machine: the hosts' bucket was not read within %.0f s; placing as they come", HOSTS_READ
                )
        self._subs.append(
            await self.nc.subscribe(subjects.COMMANDS_ALL, queue="sandboxctl-statemachine", cb=self._on_command)
        )
        await settle(self.nc)  # the server has the subscription: started means taking commands
        self.tasks.append(asyncio.create_task(self._consume_facts(), name="statemachine-facts"))
        self.tasks.append(asyncio.create_task(self._watchdog(), name="statemachine-watchdog"))
        self.tasks.append(
            asyncio.create_task(
                snapshots.keep_writing(self, "state machine", lambda: bool(self._log_created)),
                name="statemachine-snapshots",
            )
        )
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
        await self.snapshot_lease.release()

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
                name = subjects.name_of(msg.subject)
                # Most of the log is this instance's own appends, folded when they were
                # acknowledged: skip decoding them (a fifth of its CPU under load).
                if not self._applied(name, seq):
                    self._fold_logged(name, msg.data, seq)
                self.position, self._subject_at = seq, msg.subject
            if self._tail.next_seq > target:
                self._caught_up.set()

    async def _catch_up(self, target: int) -> None:
        """Fold the log up to ``target`` from a reader process. Commands wait for it (the
        service is not ready until it is caught up), so a restart on a long log is as
        short as reading it; a reader that fails leaves the rest to the Tail."""
        reader = Frames(self.nc, subjects.LOG_STREAM, subjects.LOG_ALL, self.position + 1, target)
        async with reader:
            async for last, payloads, names in reader:
                for seq, data, name in zip(range(last - len(payloads) + 1, last + 1), payloads, names, strict=True):
                    self._fold_logged(name, data, seq)
                self.position = last
                if names:
                    self._subject_at = subjects.log(names[-1])
        if self.position < target:
            log.warning(
                "state machine: catch-up reader stopped at %d of %d (%s); reading on",
                self.position,
                target,
                reader.error,
            )

    def _fold_logged(self, name: str, data: bytes, seq: int) -> None:
        state, envelope, problem = fold_logged(self.states.get(name), name, data, seq)
        if problem:
            # Skipped, the same way by every reader; `audit verify` lists it for operators.
            log.error("log seq %d of %s is skipped: %s", seq, name, problem)
            if state is None:
                self._skipped[name] = seq
                return
        self._keep(name, state)
        if envelope is not None and envelope.commanddigest and not problem and state is not None:
            self._remember(envelope, state, seq)

    def _remember(self, envelope: Envelope, state: SandboxState, seq: int) -> None:
        """Keep the outcome of a recent command read from the log (another instance's, or from
        before a restart), so a retry of it gets its first outcome here too."""
        moment = envelope.time.timestamp()
        if time.time() - moment >= self._outcomes.ttl:
            return
        key, _, index = envelope.id.rpartition(":")
        reply = Reply(
            accepted=True,
            sandbox=state.name,
            phase=state.phase.value,
            seq=seq,
            appended=int(index) + 1 if index.isdigit() else 1,
        )
        self._outcomes.put(key, envelope.commanddigest, reply, moment)

    def _keep(self, name: str, state: SandboxState | None) -> None:
        if state is None:
            return
        self.loads.changed(self.states.get(name), state)
        self.states[name] = state
        self._skipped.pop(name, None)
        if state.phase in TRANSIENT:
            self._transient.add(name)
        else:
            self._transient.discard(name)

    def _last_seq(self, name: str) -> int:
        """The sequence of the last log entry of ``name`` this instance has folded or skipped."""
        state = self.states.get(name)
        return state.seq if state is not None else self._skipped.get(name, 0)

    def _applied(self, name: str, seq: int) -> bool:
        """Whether the cache already holds log position ``seq`` of ``name``: our own appends are
        folded on their ack and come back through the log, in either order."""
        return self._last_seq(name) >= seq

    def _fold(self, envelope: Envelope, seq: int) -> None:
        if self._applied(envelope.subject, seq):
            return
        self._keep(envelope.subject, evolve(self.states.get(envelope.subject), envelope, seq))

    async def _wait_for(self, name: str, seq: int, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.position < seq and self._last_seq(name) < seq:
            if loop.time() > deadline:
                raise TimeoutError(f"log reader did not reach seq {seq}")
            await asyncio.sleep(0.002)

    # -- snapshots -----------------------------------------------------------------

    async def _restore_snapshot(self) -> None:
        """Start from the snapshot (bus/snapshots.py) when there is one this code may fold on from:
        only what the log holds after it is read, however long the log."""
        began = time.monotonic()
        try:
            info = await self.js.stream_info(subjects.LOG_STREAM)
            self._log_created = info.created.isoformat() if info.created else ""
            store = await snapshots.snapshot_store(self.js, self.replicas)
            snapshot = await snapshots.load(self.js, store, self._log_created, info.state.last_seq)
        except Exception as exc:
            reraise_if_cancelling()
            log.warning("state machine: no snapshot read (%r); folding the log from its start", exc)
            return
        if snapshot is None:
            return
        for state in snapshot.states:
            self._keep(state.name, state)
        self._skipped.update(snapshot.skipped)
        self.position = self.snapshot_at = snapshot.position
        self._subject_at = snapshot.subject
        log.info(
            "state machine: snapshot of %d sandboxes at seq %d read in %.0f ms",
            len(snapshot.states),
            snapshot.position,
            (time.monotonic() - began) * 1000,
        )

    async def write_snapshot(self) -> int:
        """Write the snapshot of every state as folded now; its log position."""
        snapshot = snapshots.Snapshot(
            format=snapshots.FORMAT,
            schema=snapshots.SCHEMA,
            log_created=self._log_created,
            position=self.position,
            subject=self._subject_at,
            states=list(self.states.values()),
            skipped=dict(self._skipped),
        )
        began = time.monotonic()
        data = await asyncio.to_thread(snapshots.encode_snapshot, snapshot)
        await snapshots.save(await snapshots.snapshot_store(self.js, self.replicas), data)
        self.snapshot_at = snapshot.position
        log.info(
            "state machine: snapshot of %d sandboxes at seq %d written (%d bytes, %.0f ms)",
            len(snapshot.states),
            snapshot.position,
            len(data),
            (time.monotonic() - began) * 1000,
        )
        return snapshot.position

    # -- the one decide-and-append loop ------------------------------------------

    async def _decide_and_append(
        self,
        name: str,
        decide_fn: Callable[[SandboxState | None], list[LifecycleEvent] | Rejection],
        cause: Cause,
    ) -> Reply:
        """Decide on the current state and append what was decided, guarded by the sandbox's last
        sequence; a refusal from the log itself (someone appended first) decides again. A log that
        does not answer is tried again, deciding anew each time, for APPEND_PATIENCE seconds (a
        cluster electing a leader), then answered ``unavailable``, never ``internal``. Trying again
        is safe: the events' ids are the command's, so one stored after all is found, never stored
        twice."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + APPEND_PATIENCE, 0.05
        # Why an earlier attempt may have been stored after all (its ack never came, or it was
        # still being stored when tried again): once there is one, the answer is never
        # ``unavailable``, which promises that nothing was done.
        doubt = ""
        while True:
            reraise_if_cancelling()
            problem = ""
            try:
                return await self._decide_and_append_once(name, decide_fn, cause)
            except OutcomeUnknown as exc:
                doubt = str(exc)
            except UNREACHABLE as exc:
                reraise_if_cancelling()
                if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
                    doubt = f"the log did not confirm an append in time: {_why(exc)}"
                problem = f"the log is unavailable: {_why(exc)}"
                if isinstance(exc, APIError) and exc.err_code in RESOURCES_EXHAUSTED:
                    problem = f"the log cannot store: {exc.description or exc}"
                    deadline = 0.0  # a full disk waits no better
            except APIError as exc:
                if exc.err_code == DUPLICATE_IN_PROCESS:
                    doubt = "an earlier attempt of this command was still being stored"
                elif (exc.code or 0) < 500 and exc.err_code not in RESOURCES_EXHAUSTED:
                    raise
                else:
                    problem = f"the log cannot store: {exc.description or exc}"
                    if exc.err_code in RESOURCES_EXHAUSTED:
                        deadline = 0.0  # a full disk waits no better
            if self.nc.is_closed or loop.time() + delay > deadline:
                if doubt:
                    return error_reply(
                        ErrorCode.OUTCOME_UNKNOWN,
                        f"{doubt}; look it up in the sandbox's history, or send it again with command_id {cause.id!r}",
                        name,
                    )
                return error_reply(ErrorCode.UNAVAILABLE, problem, name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _decide_and_append_once(
        self,
        name: str,
        decide_fn: Callable[[SandboxState | None], list[LifecycleEvent] | Rejection],
        cause: Cause,
    ) -> Reply:
        for _ in range(MAX_ATTEMPTS):
            state = self.states.get(name)
            decision = decide_fn(state)
            expected = self._last_seq(name)
            if isinstance(decision, Rejection) or not decision:
                # An append is checked by the log itself; a refusal or a no-op
                # is not, so make sure it was not decided on a stale cache.
                latest = await last_subject_seq(self.js, name)
                if latest > expected:
                    await self._wait_for(name, latest)
                    continue
                if isinstance(decision, Rejection):
                    return error_reply(decision.code, decision.message, name, decision.seq)
                return self._accepted(name, state, 0)
            try:
                for index, event in enumerate(decision):
                    envelope = Envelope(
                        id=f"{cause.key}:{index}",
                        type=type_name(type(event)),
                        source=SOURCE,
                        subject=name,
                        time=now(),
                        data=event,
                        actor=cause.actor,
                        correlationid=cause.correlation_id or cause.id,
                        causationid=cause.id,
                        commanddigest=cause.digest,
                    )
                    ack = await self._append(envelope, expected)
                    if ack.duplicate:
                        # Stored before: by us or a twin (a retry), or for another command that
                        # used the same id, which this one must not be answered for.
                        reused = await self._reused(envelope, ack.seq, cause)
                        if reused is not None:
                            return reused
                        await self._wait_for(name, ack.seq)
                    else:
                        self._fold(envelope, ack.seq)
                    expected = ack.seq
            except SequenceConflict:
                self.conflicts += 1
                await self._wait_for(name, await last_subject_seq(self.js, name))
                continue
            return self._accepted(name, self.states.get(name), len(decision), expected)
        return error_reply(ErrorCode.CONFLICT, f"sandbox {name} kept changing; try again", name)

    async def _append(self, envelope: Envelope, expected: int) -> Ack:
        """Append, and when JetStream's ack does not come in time, learn from the log whether the
        event was stored before answering anything: an ack can be lost after the write."""
        try:
            return await append(self.js, envelope, expected, timeout=ATTEMPT_TIMEOUT)
        except (TimeoutError, nats.errors.TimeoutError):
            try:
                stored = await self._stored_last(envelope.subject)
            except UNREACHABLE as exc:
                raise OutcomeUnknown(
                    f"the log did not confirm event {envelope.id} and cannot be asked: {_why(exc)}"
                ) from exc
            if stored is not None and (stored.headers or {}).get("Nats-Msg-Id") == envelope.id:
                return Ack(stream=subjects.LOG_STREAM, seq=int(stored.seq or 0), duplicate=False)
            raise

    async def _stored_last(self, name: str) -> RawStreamMsg | None:
        try:
            return await self._lookup.get_last_msg(subjects.LOG_STREAM, subjects.log(name))
        except NotFoundError:
            return None

    async def _reused(self, envelope: Envelope, seq: int, cause: Cause) -> Reply | None:
        """None if the event stored at ``seq`` under ``envelope``'s id answers this same command (a
        retry); otherwise the refusal: an idempotency key names one command, and a command that
        reuses one is never answered with another's outcome."""
        if not cause.digest:
            return None  # a fact's or the watchdog's event: ids derived from what caused them
        stored = await self.js.get_msg(subjects.LOG_STREAM, seq)
        try:
            first = decode_event(stored.data or b"")
        except DecodeError:
            first = None
        if first is not None and first.commanddigest == cause.digest and first.subject == envelope.subject:
            return None
        other = subjects.name_of(stored.subject or "")
        return error_reply(
            ErrorCode.INVALID_ARGUMENT,
            f"command_id {cause.id!r} was already used for another command (log seq {seq}, sandbox {other}): "
            "an idempotency key names one command; send this one with a new id",
            envelope.subject,
        )

    @staticmethod
    def _accepted(name: str, state: SandboxState | None, appended: int, seq: int = 0) -> Reply:
        """Accepted: ``seq`` is the last event this command appended (the sandbox's position for a
        no-op), so a caller waits from exactly what it caused."""
        return Reply(
            accepted=True,
            sandbox=name,
            phase=state.phase.value if state else "",
            seq=seq or (state.seq if state else 0),
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
        tokens = msg.subject.split(".")
        user = tokens[3] if self.authorizer is not None and len(tokens) == 4 else ""
        if msg.reply and not subjects.replies_to(msg.reply, user):
            # The service may write the log: a reply subject that is not the sender's inbox could
            # make it write there. Such a request is dropped unanswered, and nothing is decided.
            log.warning("dropped a command on %s asking for its reply on %s", msg.subject[:200], msg.reply[:200])
            return
        try:
            with tracing.consumed(f"decide {metrics.verb_of(msg.subject)}", msg.subject, msg.headers):
                reply = await self.handle(msg.subject, msg.data)
        except Exception as exc:  # never let one command take the service down
            log.exception("command on %s failed", msg.subject)
            reply = error_reply(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        metrics.COMMANDS.labels(
            metrics.verb_of(msg.subject), metrics.outcome_of(reply.error and reply.error.code)
        ).inc()
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except Exception:
                log.warning("could not reply on %s", msg.reply)

    async def handle(self, subject: str, payload: bytes) -> Reply:
        if subject.split(".")[2:3] == [BulkSandboxes.VERB]:
            return await self.handle_bulk(subject, payload)
        try:
            command: SandboxCommand = command_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error_reply(ErrorCode.INVALID_ARGUMENT, f"malformed command: {exc}")
        # Only the documented subjects command: sandboxctl.cmd.<verb>, and with users
        # sandboxctl.cmd.<verb>.<user> (a plain one is refused and recorded by the authorizer).
        tokens = subject.split(".")
        shapes = (3, 4) if self.authorizer is not None else (3,)
        if len(tokens) not in shapes or tokens[2] != command.VERB:
            where = subjects.command(command.VERB, "<user>" if self.authorizer is not None else "")
            return error_reply(
                ErrorCode.INVALID_ARGUMENT,
                f"a {command.VERB} command was sent to {subject[:200]}; send it to {where}",
                command.name,
            )
        problem = validate_name(command.name)
        if problem:
            # Before anything looks the name up: it is used as a subject token, and "*" or ">" would match others.
            return error_reply(ErrorCode.INVALID_ARGUMENT, problem)
        key = command.command_id
        if self.authorizer is not None:
            denied = check(self.authorizer, subject, command)
            if denied is not None:
                # Recorded before it is answered, and only there: the log holds what happened.
                await record_denied(self.js, denied)
                return error_reply(ErrorCode.PERMISSION_DENIED, denied.reason, command.name)
            # The subject's user token is who sent it (only that user may publish there); the payload's claim is not.
            command = msgspec.structs.replace(command, actor=tokens[3])
            key = f"{tokens[3]}/{command.command_id}"  # each user's ids are its own
        if isinstance(command, CreateSandbox) and not command.driver:
            command = msgspec.structs.replace(command, driver=self.default_driver)
        if isinstance(command, CreateSandbox) and command.idle_timeout is None:
            command = msgspec.structs.replace(command, idle_timeout=self.idle_timeout)
        digest = command_digest(command)
        moment = time.time()
        known = self._outcomes.get(key, moment)
        if known is not None:
            first_digest, first = known
            if first_digest == digest:
                return first  # a retry: its first outcome, whatever happened since
            return error_reply(
                ErrorCode.INVALID_ARGUMENT,
                f"command_id {command.command_id!r} was already used for another command (sandbox {first.sandbox}, "
                f"log seq {first.seq}): an idempotency key names one command; send this one with a new id",
                command.name,
            )
        decide_fn: Callable[[SandboxState | None], list[LifecycleEvent] | Rejection]
        placed = ""  # the host a create is placed on
        if isinstance(command, CloneSandbox):
            # The source as it is now: its state from the cache, what it is made of from its log.
            clone, source = command, self.states.get(command.source)
            spec = None if source is None else await recorded_spec(self.js, command.source, source.sandbox_id)

            # A clone goes to its source's host (the workspace is copied there): refused, like any
            # new sandbox, while that host is lost, drained or full.
            unfit = ""
            if self.placer is not None and source is not None and source.host:
                unfit = self.placer.why_not(source.host, source.driver, spec.resources if spec else NO_LIMITS)
                placed = "" if unfit else source.host

            def decide_fn(state: SandboxState | None) -> list[LifecycleEvent] | Rejection:
                if unfit and (state is None or state.phase is Phase.DELETED):
                    return Rejection(
                        ErrorCode.FAILED_PRECONDITION,
                        f"sandbox {clone.source} is on host {source.host if source else ''}, which is {unfit}: "
                        "a clone is made beside its source",
                    )
                return decide_clone(state, source, spec, clone, self.drivers, moment)
        elif isinstance(command, CreateSandbox) and self.hosts is not None:
            create = command
            chosen = self._place(create)
            if isinstance(chosen, Rejection) and await self.hosts.reload():
                chosen = self._place(create)
            placed = chosen if isinstance(chosen, str) else ""

            def decide_fn(state: SandboxState | None) -> list[LifecycleEvent] | Rejection:
                if (state is not None and state.phase is not Phase.DELETED) or create.driver not in self.drivers:
                    # already_exists, a retry's no-op, or an unknown driver: the decider's answer
                    return decide(state, create, self.drivers, moment)
                if isinstance(chosen, Rejection):
                    return chosen
                return decide(state, msgspec.structs.replace(create, host=chosen), self.drivers, moment)
        else:

            def decide_fn(state: SandboxState | None) -> list[LifecycleEvent] | Rejection:
                return decide(state, command, self.drivers, moment)

        # Counted on its host until its created event is folded: creates placed at the same moment
        # see each other.
        reserved = (placed, getattr(command, "resources", NO_LIMITS)) if placed else None
        if reserved is not None:
            self.loads.reserve(*reserved)
        try:
            reply = await self._decide_and_append(
                command.name, decide_fn, Cause(key, command.command_id, command.actor, command.correlation_id, digest)
            )
        finally:
            if reserved is not None:
                self.loads.release(*reserved)
        if reply.accepted:
            self._outcomes.put(key, digest, reply, moment)
        return reply

    def _react_to(
        self, reporter: str | None, fact: Fact, state: SandboxState | None
    ) -> list[LifecycleEvent] | Rejection:
        """What ``fact`` makes of the sandbox, if its reporter (the host token of its subject) may
        speak for it (statemachine.placement.foreign_report); refused otherwise."""
        adopter = self.hosts.adopters.get(state.driver) if self.hosts is not None and state is not None else None
        why = foreign_report(state, reporter, adopter)
        if why:
            return Rejection(ErrorCode.PERMISSION_DENIED, why)
        return react(state, fact)

    def _host_changed(self, name: str) -> None:
        """The hosts' view changed for ``name`` (announced, renewed, drained, gone): placement's too."""
        assert self.hosts is not None and self.placer is not None
        host = self.hosts.hosts.get(name)
        candidate = None
        if host is not None:
            candidate = Candidate(
                name=name,
                engines=tuple(host.engines),
                labels=host.labels,
                max_sandboxes=host.max_sandboxes,
                cpus=host.cpus,
                memory=host.memory,
                draining=name in self.hosts.draining,
            )
        self.placer.announce(name, candidate)

    def _place(self, create: CreateSandbox) -> str | Rejection:
        """The host ``create`` goes to, by the hosts as announced now and what each holds."""
        assert self.placer is not None
        return self.placer.place(create.driver, create.resources, create.host, create.constraints)

    async def handle_bulk(self, subject: str, payload: bytes) -> Reply:
        """One page of a bulk command: each sandbox it takes in gets its own command, decided and
        logged as if sent alone (statemachine/bulk.py), at most BULK_PARALLEL at a time."""
        try:
            bulk = bulk_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error_reply(ErrorCode.INVALID_ARGUMENT, f"malformed bulk command: {exc}")
        tokens = subject.split(".")
        if len(tokens) not in ((3, 4) if self.authorizer is not None else (3,)):
            return error_reply(ErrorCode.INVALID_ARGUMENT, f"a bulk command was sent to {subject[:200]}")
        problem = bulk_problem(bulk)
        if problem:
            return error_reply(ErrorCode.INVALID_ARGUMENT, problem)
        prefix = ""
        if self.authorizer is not None:
            denied = check(self.authorizer, subject, bulk)
            if denied is not None:
                await record_denied(self.js, denied)
                return error_reply(ErrorCode.PERMISSION_DENIED, denied.reason)
            bulk = msgspec.structs.replace(bulk, actor=tokens[3])
            prefix = f"{tokens[3]}/"
        moment = time.time()
        # A page sent again (a retry) is answered as it was the first time, while its outcome is
        # kept; after that, each sandbox's own command id still keeps it from acting twice.
        page_key = f"{prefix}{bulk.command_id}#{bulk.after}"
        page_digest = hashlib.sha256(encode(bulk)).hexdigest()[:32]
        known_page = self._outcomes.retried(page_key, page_digest, moment)
        if known_page is not None:
            return known_page
        names = sorted(
            name
            for name, state in self.states.items()
            if name > bulk.after and state is not None and selected(state, bulk)
        )
        page, more = names[: bulk.limit], len(names) > bulk.limit
        gate = asyncio.Semaphore(BULK_PARALLEL)

        async def one(name: str) -> BulkItem:
            command = command_for(bulk, name)
            key, digest = prefix + command.command_id, command_digest(command)
            async with gate:
                known = self._outcomes.retried(key, digest, moment)
                if known is not None:
                    reply = known  # this page, sent again: its first outcome
                else:
                    reply = await self._decide_and_append(
                        name,
                        lambda state: decide(state, command, self.drivers, moment),
                        Cause(key, command.command_id, command.actor, command.correlation_id, digest),
                    )
                    if reply.accepted:
                        self._outcomes.put(key, digest, reply, moment)
            if reply.error is not None:
                return BulkItem(name=name, accepted=False, code=reply.error.code, message=reply.error.message)
            return BulkItem(name=name, accepted=True, phase=reply.phase, seq=reply.seq, appended=reply.appended)

        items = list(await asyncio.gather(*(one(name) for name in page)))
        reply = Reply(accepted=True, result=BulkPage(items=items, next=page[-1] if more else ""))
        self._outcomes.put(page_key, page_digest, reply, moment)
        return reply

    # -- deadlines -----------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            reraise_if_cancelling()
            await asyncio.sleep(self.watchdog_interval)
            now_ = time.time()
            for name in list(self._transient):
                state = self.states.get(name)
                if not overdue(state, now_, self.deadlines):
                    continue
                assert state is not None
                log.warning("%s overstayed %s; failing it with reason timeout", name, state.phase.value)
                try:
                    cause = f"{state.sandbox_id}:{state.seq}:timeout"
                    await self._decide_and_append(
                        name,
                        functools.partial(overdue, now=now_, deadlines=self.deadlines),
                        Cause(WATCHDOG_EVENTS + cause, cause, "sandboxctl/watchdog"),
                    )
                except Exception:
                    reraise_if_cancelling()
                    log.exception("watchdog could not fail %s", name)
            await self._fail_lost_hosts()

    async def _fail_lost_hosts(self) -> None:
        """Error with reason host_lost for what ran or moved on a host whose heartbeat lapsed (or
        whose announcement is gone): nothing stays in Ready, Stopping or Starting on a machine that
        is gone. Silence is counted on this instance's clock and from its own start at the
        earliest (bus.hosts.HostsView), so a plane that was down itself fails no host that is
        merely announcing itself again; a host heard from again meanwhile is left alone."""
        if self.hosts is None:
            return
        hosts = self.hosts
        for host in list(self.loads.names):
            if not host:
                continue
            announced = hosts.hosts.get(host)
            window = announced.heartbeat if announced is not None else HEARTBEAT_DEFAULT
            silent = min(hosts.age(host), time.monotonic() - self._started)
            if silent <= window:
                continue
            for name in list(self.loads.names.get(host, ())):
                state = self.states.get(name)
                if hosts.live(host) or not host_lost(state, host, silent):
                    continue
                assert state is not None
                log.warning("%s is %s on host %s, lost %.0f s ago: failing it", name, state.phase.value, host, silent)
                try:
                    cause = f"{state.sandbox_id}:{state.seq}:{HOST_LOST}"
                    await self._decide_and_append(
                        name,
                        functools.partial(host_lost, host=host, silent_for=silent),
                        Cause(WATCHDOG_EVENTS + cause, cause, "sandboxctl/watchdog"),
                    )
                except Exception:
                    reraise_if_cancelling()
                    log.exception("watchdog could not fail %s on lost host %s", name, host)

    # -- facts -------------------------------------------------------------------

    async def _consume_facts(self) -> None:
        config = durable_pull(FACTS_CONSUMER, subjects.FACTS_ALL, ack_wait=FACTS_ACK_WAIT, max_ack_pending=10_000)
        pull = Pull(
            self.js, subjects.FACTS_STREAM, config, group=FACTS_GROUP, pin_timeout=FACTS_PIN_TIMEOUT, keep_alive=True
        )
        self._facts = pull
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
            await pull.release()

    async def _apply_facts(self, msgs: list[Msg]) -> None:
        # Facts of one sandbox are applied in order; different sandboxes in parallel.
        by_name: dict[str, list[Msg]] = {}
        for msg in msgs:
            by_name.setdefault(subjects.name_of(msg.subject), []).append(msg)
        await asyncio.gather(*(self._apply_sandbox_facts(batch) for batch in by_name.values()))

    async def _apply_sandbox_facts(self, msgs: list[Msg]) -> None:
        """Apply one sandbox's facts in order. A fact that is not done with (naked: the log could
        not take its events, or it failed by itself) holds back its sandbox's later facts, naked in
        turn, until it is applied or HOLD_BACK has passed (it may have gone to another reader), so
        that no fact is applied before one it follows."""
        loop = asyncio.get_running_loop()
        for msg in msgs:
            name, seq = subjects.name_of(msg.subject), stream_seq(msg)
            held = self._held_back.get(name)
            if held is not None and held[1] < loop.time():
                del self._held_back[name]
                held = None
            try:
                if held is not None and seq > held[0]:
                    await msg.nak(delay=UNAVAILABLE_RETRY)
                    continue
                done = await self._apply_fact(msg)
            except Exception:  # acknowledging or naking it failed: it comes again after the ack wait
                reraise_if_cancelling()
                log.exception("facts consumer: the fact at %d on %s could not be settled", seq, msg.subject)
                done = False
            if done:
                if held is not None and held[0] == seq:
                    del self._held_back[name]
            else:
                self._held_back[name] = (min(seq, held[0]) if held else seq, loop.time() + HOLD_BACK)

    async def _apply_fact(self, msg: Msg) -> bool:
        """Apply one fact: whether it is done with (acknowledged or dead-lettered), not naked.

        The log's trouble is not the fact's: it is tried again until the log takes its events
        (their ids are the fact's, so one stored after all is found, never stored twice), never
        dead-lettered, never acknowledged before its events are in the log. A fact that fails by
        itself (an error deciding on it, a refusal from the log) is dead-lettered after
        MAX_DELIVER failures of its own, so that none comes back for ever."""
        try:
            envelope = decode_fact(msg.data)
        except DecodeError as exc:
            log.error("dead-lettering malformed fact on %s: %s", msg.subject, exc)
            await dead_letter(self.js, FACTS_CONSUMER, msg, f"unreadable fact: {exc}")
            return True
        fact = envelope.data
        if envelope.subject != subjects.name_of(msg.subject):
            log.error("dead-lettering a fact on %s about sandbox %s", msg.subject, envelope.subject[:80])
            why = f"the fact on {msg.subject} is about sandbox {envelope.subject[:80]}: a fact speaks for its subject's"
            await dead_letter(self.js, FACTS_CONSUMER, msg, why)
            return True
        try:
            with tracing.consumed(f"react {envelope.type}", msg.subject, msg.headers):
                reply = await self._decide_and_append(
                    envelope.subject,
                    functools.partial(self._react_to, subjects.reporter_of(msg.subject), fact),
                    Cause(
                        FACT_EVENTS + envelope.id,
                        envelope.id,
                        envelope.actor or envelope.source,
                        envelope.correlationid,
                    ),
                )
        except Exception as exc:
            reraise_if_cancelling()
            if cannot_store(exc):
                reply = error_reply(ErrorCode.UNAVAILABLE, str(exc), envelope.subject)
            else:
                log.exception("applying the fact %s on %s failed", envelope.id, envelope.subject)
                reply = error_reply(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", envelope.subject)
        if reply.error is not None and reply.error.code in (ErrorCode.UNAVAILABLE, ErrorCode.OUTCOME_UNKNOWN):
            await msg.nak(delay=UNAVAILABLE_RETRY)
            return False
        if reply.error is not None and reply.error.code == ErrorCode.PERMISSION_DENIED:
            log.error("dead-lettering %s: %s", msg.subject, reply.error.message)
            await dead_letter(self.js, FACTS_CONSUMER, msg, reply.error.message)
            return True
        if reply.error is not None and reply.error.code in (ErrorCode.CONFLICT, ErrorCode.INTERNAL):
            failed = self._failures.failed(msg)
            if failed < MAX_DELIVER:
                await msg.nak(delay=retry_delay(failed))
                return False
            await dead_letter(self.js, FACTS_CONSUMER, msg, f"{reply.error.code}: {reply.error.message}")
            self._failures.forget(msg)
            return True
        await msg.ack()
        self._failures.forget(msg)
        self.facts_applied += 1
        return True
