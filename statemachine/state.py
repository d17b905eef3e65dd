"""What the decider knows about one sandbox, rebuilt by folding its events."""

from __future__ import annotations

import msgspec

from statemachine.phases import Phase


class SandboxState(msgspec.Struct, kw_only=True, gc=False):
    name: str
    sandbox_id: str
    phase: Phase
    driver: str
    seq: int = 0  # stream sequence of the last event on this sandbox's subject
    incarnation: str = ""
    last_error: str = ""
    since: float = 0.0  # when the current phase was entered (Unix time of its event): deadlines count from it
