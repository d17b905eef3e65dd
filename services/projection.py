"""The SQLite projection of the log: schema and reads, shared by the
projector (the only writer) and the query service (a reader)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec

from sandboxctl.statemachine.phases import Phase
from sandboxctl.statemachine.state import Hold, Lease, PendingWarning, SandboxState

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    name        TEXT PRIMARY KEY,
    sandbox_id  TEXT NOT NULL,
    phase       TEXT NOT NULL,
    driver      TEXT NOT NULL,
    host        TEXT NOT NULL DEFAULT '',
    image       TEXT NOT NULL,
    command     TEXT,
    labels      TEXT NOT NULL DEFAULT '{}',
    resources   TEXT NOT NULL DEFAULT '{}',
    env         TEXT NOT NULL DEFAULT '{}',
    last_error  TEXT NOT NULL DEFAULT '',
    incarnation TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,
    idle_timeout      REAL NOT NULL DEFAULT 0,
    auto_delete_after REAL NOT NULL DEFAULT 0,
    auto_archive_after REAL NOT NULL DEFAULT 0,
    archive           TEXT NOT NULL DEFAULT '',
    last_activity     TEXT NOT NULL DEFAULT '',
    activity_seq      INTEGER NOT NULL DEFAULT 0,
    leases            TEXT NOT NULL DEFAULT '[]',
    holds             TEXT NOT NULL DEFAULT '[]',
    warning           TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_phase ON sandboxes(phase);
CREATE TABLE IF NOT EXISTS checkpoint (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO checkpoint (id, seq) VALUES (1, 0)
"""
# Bumped whenever the tables change: an older projection is dropped and refolded from the
# log, which holds everything it showed (it is a cache; the log is the truth).
# 4: no history table: a sandbox's history is read from the log, which holds it already
# (sandboxctl.bus.reading.history), instead of a copy of every event written on the way in.
# 5: resources and env.
# 6: auto_archive_after, and archive: the object an Archived sandbox's workspace is stored as.
# 7: host, the host a sandbox is placed on.
SCHEMA_VERSION = 7

SANDBOX_COLUMNS = (
    "name",
    "sandbox_id",
    "phase",
    "driver",
    "host",
    "image",
    "command",
    "labels",
    "resources",
    "env",
    "last_error",
    "incarnation",
    "created_at",
    "updated_at",
    "last_seq",
    # idleness (statemachine/idle.py); times as ISO 8601 like the others
    "idle_timeout",
    "auto_delete_after",
    "auto_archive_after",
    "archive",
    "last_activity",
    "activity_seq",
    "leases",
    "holds",
    "warning",
)


T = TypeVar("T")


def in_db_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    """Run ``fn(connection, *args)`` on the database's own thread, in one hand-off. aiosqlite's
    public calls take SQL one statement at a time; the projector writes a whole batch (rows and
    position in one transaction) with one, so it needs aiosqlite's private ``_execute`` and
    ``_conn``, reached here and nowhere else."""
    return db._execute(fn, db._conn, *args)  # type: ignore[no-untyped-call]


async def connect(path: Path, readonly: bool = False) -> aiosqlite.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode=WAL")
    # The projection is rebuilt from the log, and its position commits with its rows, so
    # a lost tail after a power cut is re-projected, never wrong: no fsync on the hot path.
    await db.execute("PRAGMA synchronous=OFF")
    await db.execute("PRAGMA busy_timeout=5000")
    if not readonly:
        await _migrate(db)
    return db


async def _migrate(db: aiosqlite.Connection) -> None:
    """Create the tables, or drop and recreate ones of an older schema (checkpoint included,
    so the projector refolds the log from its start). Under a write lock: the projector and
    the query service both open the file when they start."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
        if version < SCHEMA_VERSION:
            for table in ("sandboxes", "history", "checkpoint"):
                await db.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in SCHEMA.split(";"):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.commit()
    except BaseException:
        await db.rollback()
        raise


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat() if moment else ""


def _moment(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


def idle_values(state: SandboxState) -> tuple[object, ...]:
    """The idleness columns of a sandbox row, in SANDBOX_COLUMNS order."""
    warning = state.warning
    return (
        state.idle_timeout,
        state.auto_delete_after,
        state.auto_archive_after,
        state.archive,
        _iso(state.last_activity),
        state.activity_seq,
        json.dumps([{"holder": x.holder, "expires": _iso(x.expires)} for x in state.leases]) if state.leases else "[]",
        json.dumps([{"holder": x.holder, "reason": x.reason} for x in state.holds]) if state.holds else "[]",
        None
        if warning is None
        else json.dumps(
            {
                "kind": warning.kind,
                "activity_seq": warning.activity_seq,
                "deadline": _iso(warning.deadline),
                "grace": warning.grace,
            }
        ),
    )


def idle_fields(item: dict[str, Any]) -> dict[str, Any]:
    """SandboxState fields from a row's idleness columns (the inverse of idle_values)."""
    warning = json.loads(item["warning"]) if item["warning"] else None
    return {
        "idle_timeout": float(item["idle_timeout"]),
        "auto_delete_after": float(item["auto_delete_after"]),
        "auto_archive_after": float(item["auto_archive_after"]),
        "archive": item["archive"],
        "last_activity": _moment(item["last_activity"]),
        "activity_seq": int(item["activity_seq"]),
        "leases": tuple(Lease(x["holder"], _moment(x["expires"])) for x in json.loads(item["leases"])),
        "holds": tuple(Hold(x["holder"], x["reason"]) for x in json.loads(item["holds"])),
        "warning": None
        if warning is None
        else PendingWarning(warning["kind"], warning["activity_seq"], _moment(warning["deadline"]), warning["grace"]),
    }


JSON_COLUMNS = (
    "command",
    "labels",
    "resources",
    "env",
    "leases",
    "holds",
    "warning",
)  # stored as JSON text; None when empty


def sandbox_row(row: tuple[Any, ...]) -> dict[str, Any]:
    item = dict(zip(SANDBOX_COLUMNS, row, strict=True))
    for column in JSON_COLUMNS:
        item[column] = json.loads(item[column]) if item[column] else None
    return item


def _raw_item(row: tuple[Any, ...]) -> dict[str, Any]:
    """A row as ``sandbox_row`` gives it, with the JSON columns embedded as the JSON they are
    stored as instead of decoded (to be encoded again at once)."""
    item = dict(zip(SANDBOX_COLUMNS, row, strict=True))
    for column in JSON_COLUMNS:
        item[column] = msgspec.Raw(item[column].encode()) if item[column] else None
    return item


_encode_notice = msgspec.json.Encoder().encode


# A notice carries its row only up to this size, far below any NATS max payload: a larger row
# (a log written outside events/limits.py's bounds) is announced without it, and a waiter reads
# it with a get, as it does after an older projector's notice. Publishing it whole would fail,
# and take the projector down with it.
NOTICE_MAX = 256 * 1024


def projected_notice(row: tuple[Any, ...]) -> tuple[str, bytes]:
    """The sandbox a row belongs to, and the projector's notice of it: name, phase,
    sequence and the row as ``sandbox_row`` gives it (left out past NOTICE_MAX). The JSON columns
    go in as the JSON they are stored as, not decoded and encoded again: the projector sends one
    or two per command."""
    item = _raw_item(row)
    name = item["name"]
    notice = {"name": name, "phase": item["phase"], "seq": item["last_seq"]}
    encoded = _encode_notice({**notice, "item": item})
    return name, encoded if len(encoded) <= NOTICE_MAX else _encode_notice(notice)


def encoded_row(row: tuple[Any, ...]) -> bytes:
    """A row as JSON, exactly what ``sandbox_row`` decodes to: a list page is built from these,
    measured one by one, so it can be cut before it outgrows a NATS message."""
    return _encode_notice(_raw_item(row))


# What a list shows of a row too large for a reply of its own: its identity and phase, all
# bounded by events/limits.py, and ``truncated`` so the reader knows the rest was left out.
STUB_COLUMNS = ("name", "sandbox_id", "phase", "driver", "host", "last_seq", "updated_at")


def stub_row(row: tuple[Any, ...]) -> bytes:
    item = dict(zip(SANDBOX_COLUMNS, row, strict=True))
    return _encode_notice({**{c: item[c] for c in STUB_COLUMNS}, "truncated": True})


async def get_sandbox(db: aiosqlite.Connection, name: str) -> dict[str, Any] | None:
    rows = await db.execute_fetchall(f"SELECT {', '.join(SANDBOX_COLUMNS)} FROM sandboxes WHERE name = ?", (name,))
    found = [tuple(row) for row in rows]
    return sandbox_row(found[0]) if found else None


FETCH = 256  # rows per hand-off from SQLite's thread while a page is filled


async def rows_after(
    db: aiosqlite.Connection,
    after: str,
    limit: int,
    phases: Collection[Phase] = (),
    labels: Mapping[str, str] | None = None,
    include_deleted: bool = False,
    host: str = "",
) -> AsyncGenerator[tuple[Any, ...], None]:
    """At most ``limit`` rows whose name sorts after ``after``, in name order, that match the
    filters: with ``phases``, rows in one of them; without, every row but Deleted ones unless
    ``include_deleted``; with ``labels``, rows carrying each of them; with ``host``, rows placed there.

    The rows are read along the primary key from the cursor on, and the filters are applied on
    the way (``+phase`` keeps SQLite off the phase index, which would make it sort every match
    for each page), so listing N rows page by page costs O(N) in all, however the filters cut.
    Label keys must be valid (events.commands.LabelKey): they are spliced into a JSON path."""
    where = ["name > ?"]
    args: list[Any] = [after]
    if phases:
        where.append(f"+phase IN ({', '.join('?' * len(phases))})")
        args.extend(Phase(p).value for p in phases)
    elif not include_deleted:
        where.append("+phase != ?")
        args.append(Phase.DELETED.value)
    if host:
        where.append("host = ?")
        args.append(host)
    for key, value in (labels or {}).items():
        where.append("json_extract(labels, ?) = ?")
        args.extend([f'$."{key}"', value])
    sql = f"SELECT {', '.join(SANDBOX_COLUMNS)} FROM sandboxes WHERE {' AND '.join(where)} ORDER BY name LIMIT ?"
    args.append(limit)
    async with db.execute(sql, args) as cursor:
        while rows := await cursor.fetchmany(FETCH):
            for row in rows:
                yield tuple(row)


async def phase_counts(db: aiosqlite.Connection) -> dict[Phase, int]:
    """How many sandboxes are in each phase (every phase, 0 for none), from the phase index alone."""
    counts = dict.fromkeys(Phase, 0)
    for phase, count in await db.execute_fetchall("SELECT phase, COUNT(*) FROM sandboxes GROUP BY phase"):
        counts[Phase(phase)] = int(count)
    return counts


async def host_counts(db: aiosqlite.Connection) -> dict[str, tuple[int, int]]:
    """Per host, how many sandboxes are placed there (not Deleted) and how many of them are Ready."""
    rows = await db.execute_fetchall(
        "SELECT host, COUNT(*), SUM(phase = ?) FROM sandboxes WHERE phase != ? GROUP BY host",
        (Phase.READY.value, Phase.DELETED.value),
    )
    return {host: (int(placed), int(running or 0)) for host, placed, running in rows}


async def in_error(db: aiosqlite.Connection, limit: int, reason_max: int) -> list[dict[str, Any]]:
    """Up to ``limit`` sandboxes in Error, most recently failed first: name, when, and the
    reason cut to ``reason_max`` characters (an engine's message can be long)."""
    rows = await db.execute_fetchall(
        "SELECT name, last_error, updated_at FROM sandboxes WHERE phase = ? ORDER BY updated_at DESC, name LIMIT ?",
        (Phase.ERROR.value, limit),
    )
    return [{"name": n, "last_error": e[:reason_max], "updated_at": u} for n, e, u in rows]


async def checkpoint(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT seq FROM checkpoint WHERE id = 1"))
    return int(rows[0][0]) if rows else 0
