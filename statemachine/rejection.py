"""What ``decide`` returns: the events to append, or why not."""

from __future__ import annotations

import msgspec

from sandboxctl.events.lifecycle import LifecycleEvent
from sandboxctl.events.replies import ErrorCode


class Rejection(msgspec.Struct, frozen=True):
    code: ErrorCode
    message: str
    seq: int = 0  # a conflict's: the sandbox's current log sequence, to read from and decide again


Decision = list[LifecycleEvent] | Rejection
