"""Audit and replay: answers read from the log itself, never from the projection.

The projection is a cache that can be wrong or lost; an auditor needs what the
source of truth says. Everything here reads SANDBOXCTL_LOG in order and folds
it with the same ``evolve`` the services use.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from sandboxctl.bus.eventlog import fold_logged
from sandboxctl.bus.reading import Point, read_events
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope
from sandboxctl.events.lifecycle import SandboxCreated
from sandboxctl.events.webhooks import type_matches
from sandboxctl.statemachine import IllegalTransition, Phase, SandboxState, evolve


def parse_point(text: str) -> Point:
    """``TIME|SEQ`` on the command line: a number is a log sequence, anything else an ISO time."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a log sequence nor an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def state_as_of(js: JetStreamContext, name: str, point: Point) -> SandboxState | None:
    """The sandbox exactly as it stood at ``point``, folded from the log."""
    state: SandboxState | None = None
    async for seq, _, msg in read_events(js, name, until=point):
        state, _, _ = fold_logged(state, name, msg.data, seq)
    return state


class Violation(msgspec.Struct):
    seq: int
    sandbox: str
    problem: str


async def verify(js: JetStreamContext) -> tuple[int, list[Violation]]:
    """Check the log's invariants; returns how many events were read and what is wrong.

    - every event's transition is allowed by the state machine;
    - each sandbox's events form an unbroken chain: every append was guarded by
      the sequence of the one before it on the same subject;
    - nothing of a sandbox follows its Deleted (a later create of the same name
      is a new sandbox, with a new id);
    - every event id, and so every command id, appears once.
    """
    states: dict[str, SandboxState] = {}
    last: dict[str, int] = {}
    ids: dict[str, int] = {}
    problems: list[Violation] = []
    count = 0
    async for seq, envelope, msg in read_events(js):
        count += 1
        name = subjects.name_of(msg.subject)
        expected = (msg.headers or {}).get("Nats-Expected-Last-Subject-Sequence")
        if expected is None:
            problems.append(Violation(seq, name, "appended without a sequence guard"))
        elif int(expected) != last.get(name, 0):
            problems.append(
                Violation(
                    seq, name, f"chain broken: guarded by seq {expected}, but the event before is {last.get(name, 0)}"
                )
            )
        last[name] = seq
        if isinstance(envelope, Exception):
            problems.append(Violation(seq, name, f"unreadable: {envelope}"))
            continue
        if envelope.subject != name:
            # Skipped, as every reader skips it (bus.eventlog.fold_logged): folding it here would
            # judge what follows against a state no service ever had.
            problems.append(Violation(seq, name, f"envelope names sandbox {envelope.subject!r}"))
            continue
        if envelope.id in ids:
            problems.append(Violation(seq, name, f"event id {envelope.id} already appended at seq {ids[envelope.id]}"))
        ids.setdefault(envelope.id, seq)
        state = states.get(name)
        if state is not None and state.phase is Phase.DELETED:
            data = envelope.data
            if not isinstance(data, SandboxCreated) or data.sandbox_id == state.sandbox_id:
                problems.append(Violation(seq, name, f"{envelope.type} follows Deleted"))
                continue
        try:
            states[name] = evolve(state, envelope, seq)
        except IllegalTransition as exc:
            problems.append(Violation(seq, name, str(exc)))
    return count, problems


class Difference(msgspec.Struct):
    table: str
    key: str
    live: Any
    replayed: Any


async def rebuild(nc: NATS, out: Path, until: Point | None = None) -> int:
    """Fold the log into a fresh projection at ``out``; returns the last sequence folded."""
    if os.path.exists(out):  # noqa: ASYNC240 -- one stat before any I/O starts
        raise FileExistsError(f"{out} exists; replay writes a fresh projection")
    from sandboxctl.services.projector import Projector  # replay's alone: the other tools need no projection

    projector = Projector(nc, out, notify=False)
    await projector.open()
    try:
        js = nc.jetstream()
        batch: list[Msg] = []
        async for seq, envelope, msg in read_events(js, until=until):
            del seq, envelope
            batch.append(msg)
            if len(batch) >= 1000:
                await projector.apply(batch)
                batch = []
        if batch:
            await projector.apply(batch)
        return projector.position
    finally:
        await projector.db.close()


async def _rows(path: Path) -> tuple[int, dict[str, tuple[Any, ...]]]:
    from sandboxctl.services.projection import SANDBOX_COLUMNS, checkpoint, connect

    db = await connect(path, readonly=True)
    try:
        position = await checkpoint(db)
        sandboxes = {
            r[0]: tuple(r) for r in await db.execute_fetchall(f"SELECT {', '.join(SANDBOX_COLUMNS)} FROM sandboxes")
        }
        return position, sandboxes
    finally:
        await db.close()


def _diff(table: str, live: dict[str, tuple[Any, ...]], fresh: dict[str, tuple[Any, ...]]) -> list[Difference]:
    return [
        Difference(table, key, live.get(key), fresh.get(key))
        for key in sorted(set(live) | set(fresh))
        if live.get(key) != fresh.get(key)
    ]


async def replay(
    nc: NATS, live: Path, until: Point | None = None, out: Path | None = None, settle: float = 5.0
) -> dict[str, Any]:
    """Rebuild the projection from the log and compare it row by row with the live one.

    Without ``until`` the comparison is made at the live projection's own position, so the
    two describe the same log and must match exactly; and the live position is measured against
    the log's head: a projector that works reaches the head it was read at within ``settle``
    seconds, one that does not (dead, or stuck on a full disk) stays ``behind``, which is
    reported, never hidden by a comparison that stops where it stopped.
    """
    info = await nc.jetstream().stream_info(subjects.LOG_STREAM)
    head = int(info.state.last_seq)
    live_position, live_sandboxes = await _rows(live)
    if until is None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle
        while live_position < head and loop.time() < deadline:
            await asyncio.sleep(0.1)
            live_position, live_sandboxes = await _rows(live)
    target: Point = live_position if until is None else until
    with tempfile.TemporaryDirectory(prefix="sandboxctl-replay-") as tmp:
        path = out or Path(tmp) / "replayed.sqlite3"
        position = await rebuild(nc, path, target)
        _, sandboxes = await _rows(path)
    compared = until is None or position == live_position
    differences = _diff("sandboxes", live_sandboxes, sandboxes) if compared else []
    return {
        "replayed_to": position,
        "live_position": live_position,
        "log_head": head,
        "behind": max(0, head - live_position),
        "compared": compared,
        "sandboxes": len(sandboxes),
        "events": position,  # the log is never deleted from: its last sequence is its length
        "differences": [msgspec.to_builtins(d) for d in differences],
    }


def selected(
    seq: int,
    envelope: Envelope,
    types: list[str] | None = None,
    actors: list[str] | None = None,
    since: Point | None = None,
) -> bool:
    if not type_matches(types or [], envelope.type):
        return False
    if actors and envelope.actor not in actors:
        return False
    if since is None:
        return True
    return seq >= since if isinstance(since, int) else envelope.time >= since


def jsonl(seq: int, envelope: Envelope) -> bytes:
    return msgspec.json.encode({"seq": seq, **msgspec.to_builtins(envelope)})


async def export(
    js: JetStreamContext,
    write: Any,
    name: str | None = None,
    types: list[str] | None = None,
    since: Point | None = None,
    until: Point | None = None,
) -> int:
    """Stream the log as JSON lines (one event per line, with its ``seq``) to ``write``."""
    start = since if isinstance(since, int) else 1
    count = 0
    async for seq, envelope, _ in read_events(js, name, start, until):
        if isinstance(envelope, Exception) or not selected(seq, envelope, types, None, since):
            continue
        write(jsonl(seq, envelope) + b"\n")
        count += 1
    return count
