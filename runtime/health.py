"""Health: each service's state and its position against the log's head, on request.

Every process that runs services answers a request on ``sandboxctl.health`` (no
queue group: each one answers) with one report per service it runs: whether it
is healthy and why not, its position in the log, the log's last sequence and
the lag between them, how often it was restarted, its pid and host. A caller
gathers the replies for a short while (``gather``), so it sees every process of
a deployment, ``sandboxctl up`` or many ``serve --only`` alike; ``status`` prints
them and says, by its exit code, whether anything is down or behind.

A service is *behind* when it has not reached the log's last sequence and its
position has not moved for ``BEHIND_AFTER`` seconds: a projector frozen by a
failed write, say, while commands wait on it. One that lags but moves is only
*catching up*, which is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from sandboxctl.events import subjects
from sandboxctl.events.health import ServiceHealth

log = logging.getLogger(__name__)

HEALTH = subjects.HEALTH
GATHER = 1.0  # how long a caller collects replies: every process answers within milliseconds
BEHIND_AFTER = 10.0  # seconds a lagging position may stand still before it counts as behind
LOG_HEAD_TTL = 0.5  # how long the log's last sequence is reused between questions
REPLY_PREFIX = subjects.INBOXES  # where answers may go (see Responder)
ANSWERS = subjects.INBOXES_ALL  # what a service's user may publish to answer (sandboxctl.auth)

OK, CATCHING_UP, BEHIND, MISSING = "ok", "catching up", "behind", "missing"
# The services a deployment needs; a status that hears of none of one of them reports it missing.
REQUIRED = ("statemachine", "projector", "query", "reaper")
DRIVER_PREFIX = "driver-"
HOST_COMPONENT = "host"  # the announcement of the host a process's driver workers run on (runtime/host.py)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[ServiceHealth]).decode


class Progress:
    """Whether one service's position moves: the memory ``behind`` needs between looks."""

    def __init__(self) -> None:
        self.position: int | None = None
        self.moved = time.monotonic()
        self.lagging_since: float | None = None

    def assess(
        self, position: int | None, last_seq: int | None, now: float, behind_after: float | None = None
    ) -> tuple[str, str]:
        """(status, reason) for a running service at ``position`` with the log at ``last_seq``."""
        behind_after = BEHIND_AFTER if behind_after is None else behind_after
        if position != self.position:
            self.position, self.moved = position, now
        if position is None or last_seq is None or position >= last_seq:
            self.lagging_since = None
            return OK, ""
        if self.lagging_since is None:
            self.lagging_since = now
        still = now - max(self.moved, self.lagging_since)
        if still >= behind_after:
            return BEHIND, f"at {position} of {last_seq}, not moving for {still:.0f}s"
        return CATCHING_UP, f"{last_seq - position} behind, moving"


class LogHead:
    """The log's last sequence, asked of the server at most every ``LOG_HEAD_TTL`` seconds."""

    def __init__(self, nc: NATS) -> None:
        self.js = nc.jetstream(timeout=2.0)
        self._value: int | None = None
        self._at = 0.0

    async def last_seq(self) -> int | None:
        now = time.monotonic()
        if now - self._at >= LOG_HEAD_TTL:
            self._at = now
            try:
                self._value = int((await self.js.stream_info(subjects.LOG_STREAM)).state.last_seq)
            except Exception as exc:  # no server, no stream yet: the positions cannot be judged
                log.debug("log head: %s", exc)
                self._value = None
        return self._value


def report(
    component: str,
    status: str,
    reason: str = "",
    position: int | None = None,
    last_seq: int | None = None,
    restarts: int = 0,
    counters: dict[str, int] | None = None,
) -> ServiceHealth:
    """One service's report from this process."""
    lag = max(0, last_seq - position) if position is not None and last_seq is not None else None
    return ServiceHealth(
        component=component,
        healthy=status in (OK, CATCHING_UP),
        status=status,
        reason=reason,
        position=position,
        last_seq=last_seq,
        lag=lag,
        restarts=restarts,
        pid=os.getpid(),
        host=socket.gethostname(),
        counters=counters or {},
    )


class Responder:
    """Answers ``sandboxctl.health`` for this process with what ``reports`` returns."""

    def __init__(self, nc: NATS, reports: Callable[[], Awaitable[list[ServiceHealth]]]) -> None:
        self.nc = nc
        self.reports = reports
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(HEALTH, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_request(self, msg: Msg) -> None:
        # The asker picks the reply subject, and this connection's user may publish where its
        # service writes (the log, facts): answer into an inbox only, never onto a stream.
        if not msg.reply.startswith(REPLY_PREFIX):
            if msg.reply:
                log.warning("a health request asked for its answer on %s, not an inbox: ignored", msg.reply[:200])
            return
        try:
            await self.nc.publish(msg.reply, _encode(await self.reports()))
        except Exception as exc:
            log.warning("answering a health request: %s", exc)


class Watch:
    """Says when a service falls behind the log and when it has caught up again (its
    process's supervisor says when one fails, restarts and is back)."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def observe(self, reports: Iterable[ServiceHealth]) -> None:
        for r in reports:
            before = self.seen.get(r.component)
            self.seen[r.component] = r.status
            if r.status == BEHIND and before != BEHIND:
                log.warning("%s is behind the log: %s", r.component, r.reason)
            elif before == BEHIND and r.status in (OK, CATCHING_UP):
                log.warning("%s has caught up with the log (at %s)", r.component, r.position)


async def gather(nc: NATS, wait: float = GATHER, refused: asyncio.Future[None] | None = None) -> list[ServiceHealth]:
    """Every report that arrives within ``wait`` seconds of asking; ``refused`` (a future the
    server's permission refusal completes) ends the wait at once."""
    inbox = nc.new_inbox()
    replies: list[ServiceHealth] = []

    async def collect(msg: Msg) -> None:
        try:
            replies.extend(_decode(msg.data))
        except msgspec.DecodeError as exc:
            log.warning("an unreadable health reply: %s", exc)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(HEALTH, b"", reply=inbox)
        await nc.flush()
        if refused is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(refused), wait)
        else:
            await asyncio.sleep(wait)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return sorted(replies, key=lambda r: (r.component, r.host, r.pid))


def missing(reports: list[ServiceHealth]) -> list[ServiceHealth]:
    """Rows for the services a deployment needs that no process reported."""
    have = {r.component for r in reports}
    absent = [c for c in REQUIRED if c not in have]
    if not any(c.startswith(DRIVER_PREFIX) for c in have):
        absent.append(f"{DRIVER_PREFIX}*")
    return [ServiceHealth(component=c, healthy=False, status=MISSING, reason="no process reports it") for c in absent]
