"""What the core's vocabulary says of a query: its phases must be phases, its cursor a name.

The query service refuses such a request, and the CLI and SDK ask the same before they send one,
so both give the same reason."""

from __future__ import annotations

from sandboxctl.events.queries import ListRequest
from sandboxctl.statemachine.names import validate_name
from sandboxctl.statemachine.phases import Phase

PHASES = frozenset(p.value for p in Phase)
PHASE_NAMES = ", ".join(p.value for p in Phase)


def list_problem(request: ListRequest) -> str:
    """Why a list request that decoded is still invalid ("" if it is not): an unknown phase, or
    a cursor that is not a sandbox name."""
    for phase in request.phases:
        if phase not in PHASES:
            return f"unknown phase {phase[:40]!r}; phases are {PHASE_NAMES}"
    if request.after and validate_name(request.after):
        return f"after must be a sandbox name (the next of the previous page), not {request.after[:40]!r}"
    return ""
