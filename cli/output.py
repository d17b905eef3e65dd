"""What the command line prints: rows as a table, JSON or YAML, and the exit status of each
code (the client's table, services' and its own, plus the CLI's ``broken_pipe``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml

from sandboxctl.client import EXIT_STATUS

# The reader of our output went away (`sandboxctl exec NAME -- yes | head`): the status a shell
# gives a command killed by SIGPIPE, 128 + 13.
BROKEN_PIPE = "broken_pipe"
# Each code's exit status: the one table beside the client's error types (client.errors.ERRORS),
# and the CLI's own.
EXIT_CODES = {**EXIT_STATUS, BROKEN_PIPE: 141}

TABLE_COLUMNS = ("name", "phase", "driver", "host", "image", "last_error", "updated_at")
HOST_COLUMNS = ("name", "state", "engines", "labels", "capacity", "placed", "running", "last_heartbeat")


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def show(data: Any, output: str, columns: Sequence[str] = TABLE_COLUMNS) -> None:
    """Print ``data`` (a row or a list of rows) as ``output``: table (those columns), json or yaml."""
    if output == "json":
        print(json.dumps(data, indent=2, default=str))
    elif output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        print(table(data if isinstance(data, list) else [data], columns))
