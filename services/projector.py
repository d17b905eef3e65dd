"""The projector: folds the log into SQLite for queries.

Its position lives in the same SQLite transaction as the rows it wrote, so a
crash at any point either keeps a whole batch or none of it, and a restart
resumes exactly after the last committed sequence. State is folded with the
same ``evolve`` the state machine uses, so the projection cannot disagree
with the decider about what an event means.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from events import subjects
from events.envelope import encode
from events.lifecycle import SandboxCreated
from services.log import DecodeError, decode_event, ensure_streams
from services.projection import (
    HISTORY_COLUMNS,
    SANDBOX_COLUMNS,
    checkpoint,
    connect,
    idle_fields,
    idle_values,
    sandbox_row,
)
from services.tail import Tail
from statemachine import SandboxState, evolve
from statemachine.machine import IllegalTransition
from statemachine.phases import Phase

log = logging.getLogger(__name__)

_UPSERT = (
    f"INSERT INTO sandboxes ({', '.join(SANDBOX_COLUMNS)}) VALUES ({', '.join('?' * len(SANDBOX_COLUMNS))}) "
    "ON CONFLICT(name) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in SANDBOX_COLUMNS if c not in ("name",))
)
_INSERT_HISTORY = (
    f"INSERT OR IGNORE INTO history ({', '.join(HISTORY_COLUMNS)}) VALUES ({', '.join('?' * len(HISTORY_COLUMNS))})"
)


def _write_batch(
    conn: sqlite3.Connection, upserts: list[tuple[object, ...]], history: list[tuple[object, ...]], last: int
) -> None:
    """A batch's rows, history and position in one transaction, run on aiosqlite's thread."""
    try:
        conn.executemany(_UPSERT, upserts)
        conn.executemany(_INSERT_HISTORY, history)
        conn.execute("UPDATE checkpoint SET seq = ? WHERE id = 1", (last,))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


class Row(msgspec.Struct):
    """A sandbox as the projection stores it: decider state plus descriptive fields."""

    state: SandboxState
    image: str
    command: str | None
    labels: str
    created_at: str
    updated_at: str

    def values(self) -> tuple[object, ...]:
        s = self.state
        return (
            s.name,
            s.sandbox_id,
            s.phase.value,
            s.driver,
            self.image,
            self.command,
            self.labels,
            s.last_error,
            s.incarnation,
            self.created_at,
            self.updated_at,
            s.seq,
            *idle_values(s),
        )


class Projector:
    def __init__(self, nc: NATS, db_path: Path, notify: bool = True) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.db_path = db_path
        self.notify = notify
        self.rows: dict[str, Row] = {}
        self.position = 0
        self.caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await ensure_streams(self.js)
        await self.open()
        self.tail = Tail(self.js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=self.position + 1)
        self._task = asyncio.create_task(self._run(), name="projector")

    async def open(self) -> None:
        """Open the database and load its rows and position, without following the log
        (the audit replay feeds ``apply`` itself)."""
        self.db = await connect(self.db_path)
        self.position = await checkpoint(self.db)
        for r in await self.db.execute_fetchall(f"SELECT {', '.join(SANDBOX_COLUMNS)} FROM sandboxes"):
            item = dict(zip(SANDBOX_COLUMNS, r, strict=True))
            state = SandboxState(
                name=item["name"],
                sandbox_id=item["sandbox_id"],
                phase=Phase(item["phase"]),
                driver=item["driver"],
                seq=item["last_seq"],
                incarnation=item["incarnation"],
                last_error=item["last_error"],
                **idle_fields(item),
            )
            self.rows[state.name] = Row(
                state, item["image"], item["command"], item["labels"], item["created_at"], item["updated_at"]
            )

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self.tail.close()
        await self.db.close()

    async def _run(self) -> None:
        target = await self.tail.last_seq()
        if self.tail.next_seq > target:
            self.caught_up.set()  # nothing to read: do not wait out an idle fetch
        async for batch in self.tail.batches():
            if batch:
                await self.apply(batch)
            if self.tail.next_seq > target:
                self.caught_up.set()

    async def apply(self, batch: list[Msg]) -> None:
        changed: dict[str, Row] = {}
        history: list[tuple[object, ...]] = []
        for msg in batch:
            seq = msg.metadata.sequence.stream
            try:
                envelope = decode_event(msg.data)
            except DecodeError as exc:
                log.error("log seq %d is not a readable event: %s", seq, exc)
                continue
            name = envelope.subject
            row = self.rows.get(name)
            try:
                state = evolve(row.state if row else None, envelope, seq)
            except IllegalTransition as exc:
                log.error("log seq %d breaks the state machine: %s", seq, exc)
                continue
            stamp = envelope.time.isoformat()
            event = envelope.data
            if isinstance(event, SandboxCreated):
                row = Row(
                    state,
                    event.image,
                    json.dumps(event.command) if event.command is not None else None,
                    json.dumps(event.labels, sort_keys=True),
                    stamp,
                    stamp,
                )
            else:
                assert row is not None
                row = msgspec.structs.replace(row, state=state, updated_at=stamp)
            self.rows[name] = changed[name] = row
            history.append(
                (
                    seq,
                    name,
                    envelope.type,
                    stamp,
                    envelope.actor,
                    envelope.correlationid,
                    envelope.causationid,
                    envelope.id,
                    state.phase.value,
                    encode(event).decode(),
                )
            )
        last = batch[-1].metadata.sequence.stream
        # One hand-off to the database thread per batch, not one per statement: each costs
        # a queue, a future and a wake-up, on the path of every waiting client.
        upserts = [row.values() for row in changed.values()]
        await self.db._execute(_write_batch, self.db._conn, upserts, history, last)
        self.position = last
        if self.notify:
            for name, row in changed.items():
                # The row as a get would read it: a waiter has its answer without asking for it.
                item = sandbox_row(row.values())
                notice = {"name": name, "phase": row.state.phase.value, "seq": row.state.seq, "item": item}
                await self.nc.publish(subjects.projected(name), encode(notice))
