"""The SQLite projection of the log: schema and reads, shared by the
projector (the only writer) and the query service (a reader)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from statemachine.state import Hold, Lease, PendingWarning, SandboxState

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    name        TEXT PRIMARY KEY,
    sandbox_id  TEXT NOT NULL,
    phase       TEXT NOT NULL,
    driver      TEXT NOT NULL,
    image       TEXT NOT NULL,
    command     TEXT,
    labels      TEXT NOT NULL DEFAULT '{}',
    last_error  TEXT NOT NULL DEFAULT '',
    incarnation TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,
    idle_timeout      REAL NOT NULL DEFAULT 0,
    auto_delete_after REAL NOT NULL DEFAULT 0,
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
# (services/audit.history), instead of a copy of every event written on the way in.
SCHEMA_VERSION = 4

SANDBOX_COLUMNS = (
    "name",
    "sandbox_id",
    "phase",
    "driver",
    "image",
    "command",
    "labels",
    "last_error",
    "incarnation",
    "created_at",
    "updated_at",
    "last_seq",
    # idleness (statemachine/idle.py); times as ISO 8601 like the others
    "idle_timeout",
    "auto_delete_after",
    "last_activity",
    "activity_seq",
    "leases",
    "holds",
    "warning",
)


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
        "last_activity": _moment(item["last_activity"]),
        "activity_seq": int(item["activity_seq"]),
        "leases": tuple(Lease(x["holder"], _moment(x["expires"])) for x in json.loads(item["leases"])),
        "holds": tuple(Hold(x["holder"], x["reason"]) for x in json.loads(item["holds"])),
        "warning": None
        if warning is None
        else PendingWarning(warning["kind"], warning["activity_seq"], _moment(warning["deadline"]), warning["grace"]),
    }


JSON_COLUMNS = ("command", "labels", "leases", "holds", "warning")  # stored as JSON text; None when empty


def sandbox_row(row: tuple[Any, ...]) -> dict[str, Any]:
    item = dict(zip(SANDBOX_COLUMNS, row, strict=True))
    for column in JSON_COLUMNS:
        item[column] = json.loads(item[column]) if item[column] else None
    return item


_encode_notice = msgspec.json.Encoder().encode


def projected_notice(row: tuple[Any, ...]) -> tuple[str, bytes]:
    """The sandbox a committed row belongs to, and the projector's notice of it: name, phase,
    sequence and the row as ``sandbox_row`` gives it. The JSON columns go in as the JSON they
    are stored as, not decoded and encoded again: the projector sends one or two per command."""
    item = dict(zip(SANDBOX_COLUMNS, row, strict=True))
    for column in JSON_COLUMNS:
        item[column] = msgspec.Raw(item[column].encode()) if item[column] else None
    name = item["name"]
    return name, _encode_notice({"name": name, "phase": item["phase"], "seq": item["last_seq"], "item": item})


async def get_sandbox(db: aiosqlite.Connection, name: str) -> dict[str, Any] | None:
    rows = await db.execute_fetchall(f"SELECT {', '.join(SANDBOX_COLUMNS)} FROM sandboxes WHERE name = ?", (name,))
    rows = list(rows)
    return sandbox_row(rows[0]) if rows else None


async def list_sandboxes(
    db: aiosqlite.Connection,
    phases: list[str] | None = None,
    labels: dict[str, str] | None = None,
    include_deleted: bool = False,
) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(SANDBOX_COLUMNS)} FROM sandboxes"
    where: list[str] = []
    args: list[Any] = []
    if phases:
        where.append(f"phase IN ({', '.join('?' * len(phases))})")
        args.extend(phases)
    elif not include_deleted:
        where.append("phase != 'Deleted'")
    for key, value in (labels or {}).items():
        where.append("json_extract(labels, ?) = ?")
        args.extend([f'$."{key}"', value])
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY name"
    return [sandbox_row(r) for r in await db.execute_fetchall(sql, args)]


async def checkpoint(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT seq FROM checkpoint WHERE id = 1"))
    return int(rows[0][0]) if rows else 0
