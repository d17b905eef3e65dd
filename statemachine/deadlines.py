"""Deadlines for the transient phases: no sandbox waits on a driver for ever.

A driver that never answers (a hung engine, a lost work order) would leave a
sandbox in Provisioning, Stopping, Starting or Deleting with no way out. The
watchdog asks ``overdue`` about every sandbox in such a phase; past its
deadline the sandbox fails with reason ``timeout``, and from Error the user
can start or delete it.
"""

from __future__ import annotations

from collections.abc import Mapping

from sandboxctl.events.lifecycle import LifecycleEvent, SandboxFailed
from sandboxctl.statemachine.phases import TRANSIENT, Phase
from sandboxctl.statemachine.state import SandboxState

TIMEOUT = "timeout"

# Generous on purpose: a stop may wait out the user's grace period, a create may import a large image.
DEFAULT_DEADLINES: dict[Phase, float] = {
    Phase.PROVISIONING: 600.0,
    Phase.STOPPING: 300.0,
    Phase.STARTING: 300.0,
    Phase.PAUSING: 120.0,
    Phase.RESUMING: 120.0,
    Phase.ARCHIVING: 3600.0,  # a large workspace streams for long
    Phase.DELETING: 300.0,
}

_OPERATION = {
    Phase.PROVISIONING: "create",
    Phase.STOPPING: "stop",
    Phase.STARTING: "start",
    Phase.PAUSING: "pause",
    Phase.RESUMING: "resume",
    Phase.ARCHIVING: "archive",
    Phase.DELETING: "delete",
}

Deadlines = Mapping[str, Mapping[Phase, float]]  # driver -> phase -> seconds


def deadline_for(deadlines: Deadlines, driver: str, phase: Phase) -> float:
    for key in (driver, "*"):
        if phase in deadlines.get(key, {}):
            return deadlines[key][phase]
    return DEFAULT_DEADLINES[phase]


def overdue(state: SandboxState | None, now: float, deadlines: Deadlines) -> list[LifecycleEvent]:
    if state is None or state.phase not in TRANSIENT:
        return []
    # A start that restores an archive streams it back first: it gets as long as the archive had.
    restoring = state.phase is Phase.STARTING and bool(state.archive)
    limit = deadline_for(deadlines, state.driver, Phase.ARCHIVING if restoring else state.phase)
    # A stop counts from when its grace period ends: the engine waits that long by design.
    began = max(state.since, state.stop_by) if state.phase is Phase.STOPPING else state.since
    if now - began < limit:
        return []
    return [SandboxFailed(kind=TIMEOUT, reason=TIMEOUT, operation=_OPERATION[state.phase])]


def parse_deadlines(text: str) -> dict[str, dict[Phase, float]]:
    """``podman.Stopping=60,*.Provisioning=900``: per driver (``*`` for all) and phase, in seconds."""
    out: dict[str, dict[Phase, float]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        driver, _, phase = key.strip().rpartition(".")
        try:
            parsed = Phase(phase.strip().capitalize())
            seconds = float(value)
        except ValueError:
            raise ValueError(f"bad deadline {item!r}: use driver.Phase=seconds, e.g. podman.Stopping=60") from None
        if parsed not in TRANSIENT or seconds <= 0:
            raise ValueError(f"bad deadline {item!r}: phases with deadlines are {', '.join(sorted(TRANSIENT))}")
        out.setdefault(driver.strip() or "*", {})[parsed] = seconds
    return out
