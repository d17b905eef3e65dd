"""``sandboxctl status``: every service of the deployment, as the processes that run them report
it on ``sandboxctl.health`` (sandboxctl.runtime.health)."""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from sandboxctl.cli.output import EXIT_CODES, show
from sandboxctl.runtime.health import GATHER, HEALTH, gather, missing

COLUMNS = ("component", "status", "position", "last_seq", "lag", "restarts", "pid", "host", "reason")


async def status(client: Any, output: str = "table", wait: float = GATHER) -> int:
    """``sandboxctl status``: every service of the deployment, printed as a table (or
    ``-o json|yaml``). Exit code 0 if all are healthy; ``unavailable`` (8) if one is down,
    behind or missing, or no process answered; ``permission_denied`` (11) if the user may
    not ask. ``client`` is a SandboxClient (whose refusals are noticed at once) or a
    connected nats client."""
    nc = getattr(client, "nc", client)
    denials = getattr(client, "denials", None)
    refused = denials.watch(HEALTH) if denials is not None else None
    try:
        reports = await gather(nc, wait, refused)
    finally:
        if denials is not None and refused is not None:
            denials.forget(HEALTH, refused)
    if refused is not None and refused.done():
        user = getattr(client, "user", "") or "(none)"
        print(f"sandboxctl: permission_denied: user {user} may not ask for status ({HEALTH})", file=sys.stderr)
        return EXIT_CODES["permission_denied"]
    if not reports:
        print(
            f"sandboxctl: unavailable: no sandboxctl process answered on {HEALTH} within {wait:g}s; "
            "is sandboxctl up (or serve) running?",
            file=sys.stderr,
        )
        return EXIT_CODES["unavailable"]
    reports += missing(reports)
    rows = [msgspec.to_builtins(r) for r in reports]
    if output == "table":
        rows = [{k: ("-" if v is None else v) for k, v in row.items()} for row in rows]
    show(rows, output, COLUMNS)
    bad = [r for r in reports if not r.healthy]
    if bad:
        named = ", ".join(f"{r.component} ({r.status}{': ' + r.reason if r.reason else ''})" for r in bad[:5])
        print(f"sandboxctl: unavailable: {len(bad)} not healthy: {named}", file=sys.stderr)
        return EXIT_CODES["unavailable"]
    return 0
