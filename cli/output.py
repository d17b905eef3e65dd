"""What the command line prints: rows as a table, JSON or YAML, and the exit status of each
code (the client's table, services' and its own, plus the CLI's ``broken_pipe``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sandboxctl.client import EXIT_STATUS

# The reader of our output went away (`sandboxctl exec NAME -- yes | head`): the status a shell
# gives a command killed by SIGPIPE, 128 + 13.
BROKEN_PIPE = "broken_pipe"
# Each code's exit status: the one table beside the client's error types (client.errors.ERRORS),
# and the CLI's own.
EXIT_CODES = {**EXIT_STATUS, BROKEN_PIPE: 141}

TABLE_COLUMNS = ("name", "phase", "driver", "host", "image", "last_error", "updated_at")
HOST_COLUMNS = ("name", "state", "engines", "labels", "capacity", "placed", "running", "last_heartbeat")


# The fields that hold a moment, as Unix time (a number; 0 is none) or ISO 8601 text: JSON and
# YAML give them as ISO 8601 (UTC), a table as the time from now ("12s ago", "in 5m").
MOMENTS = frozenset({"since", "stop_by", "last_activity", "expires", "deadline", "updated_at", "created_at", "time"})


def _unix(value: Any) -> float | None:
    """A moment as Unix time; None if it is none or not a moment."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value > 0 else None
    if isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    return None


def iso(value: Any) -> Any:
    """A moment as ISO 8601 in UTC (None if none); anything else as it is."""
    if isinstance(value, str):
        return value  # ISO 8601 already
    unix = _unix(value)
    if unix is None:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else value
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(value: Any, now: float | None = None) -> str:
    """A moment as the time from now: "12s ago", "3m ago", "in 5m", "2h ago", "4d ago"."""
    unix = _unix(value)
    if unix is None:
        return "" if value in (None, 0, 0.0, "") else str(value)
    delta = (time.time() if now is None else now) - unix
    seconds = abs(delta)
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "m")):
        if seconds >= size:
            amount = f"{int(seconds // size)}{unit}"
            break
    else:
        amount = f"{int(seconds)}s"
    return f"{amount} ago" if delta >= 0 else f"in {amount}"


def moments_as_iso(data: Any) -> Any:
    """``data`` with every moment (MOMENTS, at any depth) as ISO 8601."""
    if isinstance(data, dict):
        return {k: iso(v) if k in MOMENTS else moments_as_iso(v) for k, v in data.items()}
    if isinstance(data, list):
        return [moments_as_iso(v) for v in data]
    return data


def why(data: dict[str, Any]) -> str:
    """What a history line shows of an event's data: a stop's reason, a lease's holder, ..."""
    parts = [str(data[k]) for k in ("reason", "via", "holder", "kind", "cause") if data.get(k)]
    if "grace" in data:
        parts.append(f"grace {data['grace']:g}s")
    return " ".join(parts)


def short_type(event_type: str) -> str:
    """An event's type as ``events`` prints it: ``sandbox.stopped`` for ``sandboxctl.sandbox.stopped.v1``."""
    return event_type.removeprefix("sandboxctl.").rsplit(".", 1)[0]


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows in aligned columns; moments as the time from now."""
    now = time.time()
    cells = [
        [ago(r.get(c), now) if c in MOMENTS else str(r.get(c, "") if r.get(c) is not None else "") for c in columns]
        for r in rows
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def show(data: Any, output: str, columns: Sequence[str] = TABLE_COLUMNS) -> None:
    """Print ``data`` (a row or a list of rows) as ``output``: table (those columns), json or yaml."""
    if output == "json":
        print(json.dumps(moments_as_iso(data), indent=2, default=str))
    elif output == "yaml":
        import yaml  # asked for seldom, and the slowest of the formats to import

        print(yaml.safe_dump(moments_as_iso(data), sort_keys=False, default_flow_style=False).rstrip())
    else:
        print(table(data if isinstance(data, list) else [data], columns))
