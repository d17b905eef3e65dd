"""Health: what every process that runs sandboxctl's services answers on ``sandboxctl.health``.

A request there (any payload) is answered by each such process with a JSON list of
``ServiceHealth``, one per service it runs (and per process ``up`` supervises), so a caller
gathers the answers of the whole plane for a moment (``sandboxctl status``).
"""

from __future__ import annotations

import msgspec


class ServiceHealth(msgspec.Struct, kw_only=True):
    """One service (or a process ``up`` runs) as its process sees it."""

    component: str
    healthy: bool
    status: str  # ok, catching up, behind, starting, restarting, stopped, failed, missing
    reason: str = ""
    position: int | None = None  # highest log sequence folded; None for services that keep none
    last_seq: int | None = None  # the log's last sequence when asked
    lag: int | None = None
    restarts: int = 0
    pid: int = 0
    host: str = ""
    # What the service counts since it started. The state machine: ``conflicts`` (appends the
    # sequence guard refused because another instance wrote first), ``facts_applied``,
    # ``applies_facts`` (1 while it holds the facts' pin), ``snapshot_at`` (its last snapshot's
    # log position).
    counters: dict[str, int] = {}
