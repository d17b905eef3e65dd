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
import tempfile
import time
from datetime import datetime
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.object_store import ObjectStore

from sandboxctl.bus import snapshots
from sandboxctl.bus.bulkread import BULK_BEHIND, Frames
from sandboxctl.bus.eventlog import fold_logged
from sandboxctl.bus.lease import Lease
from sandboxctl.bus.streams import ensure_streams
from sandboxctl.bus.tail import Tail, reraise_if_cancelling, stream_seq
from sandboxctl.events import subjects
from sandboxctl.events.envelope import new_id
from sandboxctl.events.lifecycle import SandboxCreated, SandboxUpdated
from sandboxctl.observe import metrics, tracing
from sandboxctl.services.projection import (
    SANDBOX_COLUMNS,
    SCHEMA_VERSION,
    checkpoint,
    connect,
    idle_fields,
    idle_values,
    in_db_thread,
    projected_notice,
)
from sandboxctl.statemachine import SandboxState
from sandboxctl.statemachine.phases import Phase

log = logging.getLogger(__name__)

_UPSERT = (
    f"INSERT INTO sandboxes ({', '.join(SANDBOX_COLUMNS)}) VALUES ({', '.join('?' * len(SANDBOX_COLUMNS))}) "
    "ON CONFLICT(name) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in SANDBOX_COLUMNS if c not in ("name",))
)

ROWS_EVERY = 1_000_000  # events between commits of rows and position while catching up: at most ~15 s redone
SNAPSHOT_CHECK = 5.0  # seconds between looks at whether a snapshot of the database is due


def _write_batch(conn: sqlite3.Connection, upserts: list[tuple[object, ...]], last: int) -> None:
    """Rows and position in one transaction, run on aiosqlite's thread."""
    try:
        conn.executemany(_UPSERT, upserts)
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
    resources: str  # JSON, as the columns hold them
    env: str
    created_at: str
    updated: datetime  # formatted only when the row is written: most events are overtaken first

    def values(self) -> tuple[object, ...]:
        s = self.state
        return (
            s.name,
            s.sandbox_id,
            s.phase.value,
            s.driver,
            s.host,
            self.image,
            self.command,
            self.labels,
            self.resources,
            self.env,
            s.last_error,
            s.incarnation,
            self.created_at,
            self.updated.isoformat(),
            s.seq,
            *idle_values(s),
        )


class Projector:
    """Folds the log into the SQLite projection that queries read.

    Consumes: every log entry, in order, from its checkpoint on (an ordered Tail; a reader
    process when far behind). Produces: one row per sandbox (its current state) and, as each batch
    is folded, a notice on ``sandboxctl.projected.<name>`` carrying the row it commits (sent while
    the commit runs: a query with ``at_least`` its position waits for the commit). Promises:
    rows and position commit in one transaction, so a crash keeps a whole batch or none and a
    restart resumes right after the last committed sequence; it folds with the state machine's
    own ``evolve`` (through ``fold_logged``), so it never disagrees with the decider."""

    def __init__(
        self,
        nc: NATS,
        db_path: Path,
        notify: bool = True,
        bulk_behind: int = BULK_BEHIND,
        snapshot_every: int = 0,
        snapshot_check: float = SNAPSHOT_CHECK,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.db_path = db_path
        self.notify = notify
        self.bulk_behind = bulk_behind
        # With snapshots (a replica of the plane's), a projector that starts with an empty database
        # takes in the projectors' snapshot, and the holder of their lease writes one every
        # ``snapshot_every`` entries; 0: the log alone (a replay, a benchmark).
        self.snapshot_every = snapshot_every
        self.snapshot_check = snapshot_check
        self.snapshot_at = 0  # the log position of the last snapshot this projector took in or wrote
        self._log_created: str | None = None  # the log's creation time, which snapshots are bound to
        self._snapshot_store: ObjectStore | None = None
        self.snapshot_lease = Lease(self.js, subjects.PROJECTION_SNAPSHOT_LEASE, f"projector-{new_id()}")
        self.rows: dict[str, Row] = {}
        self.position = 0
        self.caught_up = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []  # long-running: a supervisor watches them

    async def start(self) -> None:
        await ensure_streams(self.js)
        await self.open()
        if self.snapshot_every and self.position == 0 and not self.rows:
            await self._restore_snapshot()
        self.tail = Tail(self.js, subjects.LOG_STREAM, subjects.LOG_ALL, start_seq=self.position + 1)
        self.tasks.append(asyncio.create_task(self._run(), name="projector"))
        if self.snapshot_every:
            self.tasks.append(
                asyncio.create_task(snapshots.keep_writing(self, "projector"), name="projector-snapshots")
            )

    async def open(self) -> None:
        """Open the database and load its rows and position, without following the log
        (the audit replay feeds ``apply`` itself)."""
        self.db = await connect(self.db_path)
        await self._load()

    async def _load(self) -> None:
        self.rows = {}
        self.position = await checkpoint(self.db)
        for r in await self.db.execute_fetchall(f"SELECT {', '.join(SANDBOX_COLUMNS)} FROM sandboxes"):
            item = dict(zip(SANDBOX_COLUMNS, r, strict=True))
            state = SandboxState(
                name=item["name"],
                sandbox_id=item["sandbox_id"],
                phase=Phase(item["phase"]),
                driver=item["driver"],
                host=item["host"],
                seq=item["last_seq"],
                incarnation=item["incarnation"],
                last_error=item["last_error"],
                **idle_fields(item),
            )
            self.rows[state.name] = Row(
                state,
                item["image"],
                item["command"],
                item["labels"],
                item["resources"],
                item["env"],
                item["created_at"],
                datetime.fromisoformat(item["updated_at"]),
            )

    async def stop(self) -> None:
        """Stop following the log, within bounds, and close the database whatever happens: an open
        aiosqlite connection's thread would keep the process from exiting."""
        try:
            if self.tasks:
                for task in self.tasks:
                    task.cancel()
                await asyncio.wait(self.tasks, timeout=5)
                await asyncio.wait({asyncio.ensure_future(self.tail.close())}, timeout=5)
            if self.snapshot_every:
                await self.snapshot_lease.release()
        finally:
            await self.db.close()

    # -- snapshots -------------------------------------------------------------------

    async def _restore_snapshot(self) -> None:
        """Take in the projectors' snapshot (bus/snapshots.py) when there is one that fits this
        log and this schema: its rows and position are copied into the empty database in one
        transaction (a query service may have it open already), and only what the log holds
        after it is folded. A snapshot that cannot be read is passed by; a failure once it is in
        the database ends the start, so that no projector serves rows half loaded."""
        began = time.monotonic()
        try:
            info = await self.js.stream_info(subjects.LOG_STREAM)
            self._log_created = info.created.isoformat() if info.created else ""
            snapshot = await snapshots.load_projection(
                self.js, await self._snapshots(), SCHEMA_VERSION, self._log_created, info.state.last_seq
            )
        except Exception as exc:
            reraise_if_cancelling()
            log.warning("projector: no snapshot taken in (%r); folding the log from its start", exc)
            return
        if snapshot is None:
            return
        await in_db_thread(self.db, _take_in, snapshot.database)
        await self._load()
        self.snapshot_at = self.position
        log.info(
            "projector: snapshot of %d sandboxes at seq %d taken in in %.0f ms",
            len(self.rows),
            self.position,
            (time.monotonic() - began) * 1000,
        )

    async def _snapshots(self) -> ObjectStore:
        if self._snapshot_store is None:
            self._snapshot_store = await snapshots.projection_store(self.js)
        return self._snapshot_store

    async def write_snapshot(self) -> int:
        """Write the snapshot of the database as committed now; its log position."""
        began = time.monotonic()
        position, database = await asyncio.to_thread(_copy_database, self.db_path)
        if self._log_created is None:
            info = await self.js.stream_info(subjects.LOG_STREAM)
            self._log_created = info.created.isoformat() if info.created else ""
        subject = ""
        if position:
            subject = (await self.js.get_msg(subjects.LOG_STREAM, position)).subject or ""
        snapshot = snapshots.ProjectionSnapshot(
            format=snapshots.FORMAT,
            schema=SCHEMA_VERSION,
            log_created=self._log_created,
            position=position,
            subject=subject,
            database=database,
        )
        await snapshots.save_projection(await self._snapshots(), snapshot)
        self.snapshot_at = position
        log.info(
            "projector: snapshot at seq %d written (%d bytes, %.0f ms)",
            position,
            len(database),
            (time.monotonic() - began) * 1000,
        )
        return position

    async def _run(self) -> None:
        target = await self.tail.last_seq()
        if target - self.position >= self.bulk_behind:
            await self._catch_up(target)
            self.tail.next_seq = self.position + 1
        if self.tail.next_seq > target:
            self.caught_up.set()  # nothing to read: do not wait out an idle fetch
        async for batch in self.tail.batches():
            if batch:
                await self.apply(batch)
            if self.tail.next_seq > target:
                self.caught_up.set()

    def _fold(self, seq: int, name: str, data: bytes, changed: dict[str, Row]) -> None:
        """Fold one logged event into ``rows``, noting the row it changed. An entry that cannot be
        folded is skipped as every reader skips it (bus.eventlog.fold_logged): the row keeps its
        state but takes the entry's position, so a waiter for that position is answered."""
        row = self.rows.get(name)
        state, envelope, problem = fold_logged(row.state if row else None, name, data, seq)
        if problem:
            log.error("log seq %d of %s is skipped: %s", seq, name, problem)
            if row is not None and state is not None:
                row.state = state
                changed[name] = row
            return
        assert envelope is not None and state is not None
        event = envelope.data
        if isinstance(event, SandboxCreated):
            stamp = envelope.time.isoformat()
            row = Row(
                state,
                event.image,
                json.dumps(event.command) if event.command is not None else None,
                json.dumps(event.labels, sort_keys=True),
                msgspec.json.encode(event.resources).decode(),
                json.dumps(event.env, sort_keys=True),
                stamp,
                envelope.time,
            )
            self.rows[name] = row
        else:
            assert row is not None
            if self.caught_up.is_set() and row.state.phase is not state.phase:
                metrics.observe_transition(row.state.phase, state.phase, state.driver, state.since - row.state.since)
            row.state, row.updated = state, envelope.time  # the one live copy of the row: no new object per event
            if isinstance(event, SandboxUpdated):
                if event.labels is not None:
                    row.labels = json.dumps(event.labels, sort_keys=True)
                if event.resources is not None:
                    row.resources = msgspec.json.encode(event.resources).decode()
        changed[name] = row

    async def apply(self, batch: list[Msg]) -> None:
        changed: dict[str, Row] = {}
        # One span per traced event as it happens, ended once its row is committed (observe.tracing);
        # none for the events of a catch-up or a rebuild, whose traces ended long ago.
        spans = []
        try:
            for msg in batch:
                if msg.headers and self.caught_up.is_set():
                    span = tracing.begin("project", msg.subject, msg.headers)
                    if span is not None:
                        spans.append(span)
                self._fold(stream_seq(msg), subjects.name_of(msg.subject), msg.data, changed)
            last = stream_seq(batch[-1])
            # One hand-off to the database thread per batch, not one per statement: each costs
            # a queue, a future and a wake-up, on the path of every waiting client.
            await self._commit(changed, last)
        finally:
            for span in spans:
                span.end()

    def _submit(self, upserts: list[tuple[object, ...]], last: int) -> asyncio.Future[None]:
        """Hand rows (their values as they are now) and position to the database thread: the
        write is under way when this returns (a future, not a coroutine), so the caller may do
        other things while it runs."""
        return asyncio.ensure_future(in_db_thread(self.db, _write_batch, upserts, last))

    async def _commit(self, changed: dict[str, Row], last: int) -> None:
        upserts = [row.values() for row in changed.values()]
        writing = self._submit(upserts, last)
        try:
            if self.notify:
                # Told while SQLite writes: what a notice says is in the log already, and a get that
                # asks for at least its position (``at_least``, as the SDK's do) waits for the write.
                await self._announce(upserts)
        finally:
            await writing
            self.position = last

    async def _announce(self, upserts: list[tuple[object, ...]]) -> None:
        """Tell waiters what the log now holds: the row as a get will read it once committed, so
        a waiter has its answer without asking for it."""
        for values in upserts:
            name, notice = projected_notice(values)
            await self.nc.publish(subjects.projected(name), notice)

    async def _catch_up(self, target: int) -> None:
        """Fold the log up to ``target`` with a reader process feeding this one.

        Reading and folding each cost about a core's worth of a long replay, so the
        reader (bus/bulkread.py) runs beside the fold instead of taking turns
        with it. Rows and position go to SQLite's thread every ``ROWS_EVERY`` events,
        while the next frames are folded, and at the end, so a crash resumes at a
        position whose rows are all there. If the reader fails, what was folded is
        committed and the ordinary reader goes on from there. Waiters hear of the
        rows once, at the end."""
        changed: dict[str, Row] = {}  # since the last commit of rows
        touched: dict[str, Row] = {}  # since the catch-up began
        writing: asyncio.Future[None] | None = None  # one write in flight: memory stays bounded
        folded = committed = self.position  # committed: what the write in flight (or done) holds
        whole = True  # every frame read was folded whole: rows and ``folded`` agree

        async def settle() -> None:
            nonlocal writing
            if writing is not None:
                await writing
                writing = None
                self.position = committed

        reader = Frames(self.nc, subjects.LOG_STREAM, subjects.LOG_ALL, self.position + 1, target)
        try:
            async with reader:
                async for last, payloads, names in reader:
                    whole = False
                    for seq, data, name in zip(range(last - len(payloads) + 1, last + 1), payloads, names, strict=True):
                        self._fold(seq, name, data, changed)
                    folded, whole = last, True
                    if folded - committed >= ROWS_EVERY:
                        await settle()
                        writing = self._submit([row.values() for row in changed.values()], folded)
                        touched.update(changed)
                        changed, committed = {}, folded
        finally:
            await settle()
            if whole:
                touched.update(changed)
                await self._submit([row.values() for row in changed.values()], folded)
                self.position = folded
        if self.notify:
            await self._announce([row.values() for row in touched.values()])
        if folded < target:
            log.warning("projector: catch-up reader stopped at %d of %d (%s); reading on", folded, target, reader.error)


def _copy_database(path: Path) -> tuple[int, bytes]:
    """The database as committed now, whole, and the log position it holds (SQLite's online
    backup: a consistent copy, made beside the projector's writes)."""
    with tempfile.TemporaryDirectory(prefix="sandboxctl-projection-") as work:
        copy = Path(work) / "projection.db"
        source = sqlite3.connect(path)
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
            position = int(target.execute("SELECT seq FROM checkpoint WHERE id = 1").fetchone()[0])
            target.execute("PRAGMA journal_mode=DELETE")  # one file, no WAL beside it
        finally:
            target.close()
            source.close()
        return position, copy.read_bytes()


def _take_in(conn: sqlite3.Connection, database: bytes) -> None:
    """Copy a snapshot's rows and position into the (empty) database ``conn`` holds, in one
    transaction."""
    with tempfile.TemporaryDirectory(prefix="sandboxctl-projection-") as work:
        copy = Path(work) / "snapshot.db"
        copy.write_bytes(database)
        conn.execute("ATTACH DATABASE ? AS snap", (str(copy),))
        try:
            columns = ", ".join(SANDBOX_COLUMNS)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"INSERT INTO sandboxes ({columns}) SELECT {columns} FROM snap.sandboxes")
                conn.execute("UPDATE checkpoint SET seq = (SELECT seq FROM snap.checkpoint WHERE id = 1) WHERE id = 1")
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        finally:
            conn.execute("DETACH DATABASE snap")
