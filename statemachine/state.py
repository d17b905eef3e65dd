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
    incarnation: str = ""  # the run (engine start time) the sandbox last became Ready on
    # The latest run known to have ended (stopped or exited): a report of it, or of an older run,
    # arriving late must never bring the sandbox back to Ready on a container that is gone.
    ended: str = ""
    request_id: str = ""  # the id of the event that asked the driver for the current phase's work
    last_error: str = ""
    since: float = 0.0  # when the current phase was entered (Unix time of its event): deadlines count from it
