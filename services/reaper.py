"""The reaper: stops idle sandboxes, and never deletes one unless its creator opted in.

Its timers are durable because they are not its own: every deadline is computed
from the log (``statemachine.idle.due`` over the state folded by a Tail that
starts at sequence 1), so a reaper restarted at any moment knows every idle
deadline, every pending warning and its grace period, exactly as before. What it
does is only ever a command to the state machine, under ids derived from the
deadline (``warn-stop:<sandbox id>:<activity seq>``, ``idle:<sandbox id>:<activity
seq>``): a second reaper, or the same one after a restart, sending it again stores
nothing new (``Nats-Msg-Id`` within the duplicate window, the decider's checks
beyond it). The decider also refuses a stop whose warning was cancelled, so a
touch or a lease that reaches the log first always wins.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from nats.aio.client import Client as NATS

from sandboxctl.bus.eventlog import fold_logged
from sandboxctl.bus.lease import Lease
from sandboxctl.bus.streams import ensure_streams
from sandboxctl.bus.tail import Tail, reraise_if_cancelling, stream_seq
from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.observe import metrics
from sandboxctl.statemachine import Phase, SandboxState
from sandboxctl.statemachine.idle import REAPER, ReaperCommand, deadline, due

log = logging.getLogger(__name__)


def _watched(state: SandboxState) -> bool:
    """Whether any deadline can apply to the sandbox in its phase."""
    return deadline(state) is not None


class Reaper:
    """Stops idle sandboxes (and deletes opted-in ones) by sending commands, never by acting.

    Consumes: the whole log (an ordered Tail from sequence 1), folded into each sandbox's
    idleness. Produces: ``warn`` then ``stop`` (or ``delete``) commands, under ids derived from
    the deadline. Promises: its timers are the log's, so a restart keeps every deadline and no
    deadline fires twice; the state machine checks each command against the log first. Any
    number may run: one acts at a time, the holder of the reaper lease (bus/lease.py); the
    others fold the log too and take over within the lease's TTL of the holder's death."""

    def __init__(
        self, nc: NATS, grace: float = 60.0, interval: float = 1.0, user: str = "", actor: str = REAPER
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.grace = grace
        self.interval = interval
        # With authorization on the reaper sends on its own user's command subjects, and that user is the actor.
        self.client = SandboxClient(nc, actor=user or actor, user=user, retries=2)
        self.states: dict[str, SandboxState] = {}
        self.watched: set[str] = set()  # names with a deadline in their phase: all a tick looks at
        self.position = 0
        self.caught_up = asyncio.Event()
        # name -> (command id, the sandbox's seq when sent, when): not sent again until the log
        # answers, or a while passes (a refusal on a clock a little behind ours).
        self._sent: dict[str, tuple[str, int, float]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        who = f"{user or actor}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease = Lease(self.js, subjects.REAPER_LEASE, who)

    async def start(self) -> None:
        await ensure_streams(self.js)
        self._tail = Tail(self.js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=1)
        self.tasks.append(asyncio.create_task(self._follow_log(), name="reaper-log"))
        await self.caught_up.wait()
        self.tasks.append(asyncio.create_task(self._timers(), name="reaper-timers"))
        log.info("reaper ready: %d sandboxes with deadlines, log folded to seq %d", len(self.watched), self.position)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=5)
        await self.lease.release()
        await self._tail.close()

    async def _follow_log(self) -> None:
        target = await self._tail.last_seq()
        if self._tail.next_seq > target:
            self.caught_up.set()
        async for batch in self._tail.batches():
            for msg in batch:
                seq = stream_seq(msg)
                self.position = seq
                name = subjects.name_of(msg.subject)
                state, _, problem = fold_logged(self.states.get(name), name, msg.data, seq)
                if problem:
                    log.error("log seq %d of %s is skipped: %s", seq, name, problem)
                if state is None:
                    continue
                if state.phase is Phase.DELETED:
                    self.states.pop(state.name, None)
                    self.watched.discard(state.name)
                    self._sent.pop(state.name, None)
                    continue
                self.states[state.name] = state
                if _watched(state):
                    self.watched.add(state.name)
                else:
                    self.watched.discard(state.name)
            if self._tail.next_seq > target:
                self.caught_up.set()

    async def _timers(self) -> None:
        while True:
            reraise_if_cancelling()
            try:
                if await self.lease.hold():  # else another reaper acts; this one stands by
                    self.tick(time.time())
            except Exception:
                reraise_if_cancelling()
                log.exception("reaper tick failed")
            await asyncio.sleep(self.interval)

    def tick(self, now: float) -> None:
        """Send what every due deadline calls for; each send runs on its own."""
        for name in list(self.watched):
            state = self.states.get(name)
            if state is None:
                continue
            command = due(state, now, self.grace, self.client.actor)
            if command is None:
                continue
            sent = self._sent.get(name)
            retry = max(5.0, self.interval)
            if sent is not None and sent[:2] == (command.command_id, state.seq) and now - sent[2] < retry:
                continue  # sent already; the log has not answered yet
            self._sent[name] = (command.command_id, state.seq, now)
            task = asyncio.create_task(self._send(command))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _send(self, command: ReaperCommand) -> None:
        try:
            reply = await self.client.send(command)
        except SandboxError as exc:
            # Stale (used since, leased, already gone): the log has news the next tick will see.
            log.info("reaper: %s of %s refused: %s", command.VERB, command.name, exc)
            metrics.REAPER_ACTIONS.labels(command.VERB, metrics.outcome_of(exc.code)).inc()
            return
        except Exception:
            reraise_if_cancelling()
            log.exception("reaper: %s of %s failed", command.VERB, command.name)
            metrics.REAPER_ACTIONS.labels(command.VERB, "failed").inc()
            return
        metrics.REAPER_ACTIONS.labels(command.VERB, "appended" if reply.appended else "unchanged").inc()
        if reply.appended:
            what = getattr(command, "kind", "") or getattr(command, "reason", "")
            log.warning("reaper: %s %s (%s) at log seq %d", command.VERB, command.name, what, reply.seq)
