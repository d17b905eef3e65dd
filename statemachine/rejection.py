"""What ``decide`` returns: the events to append, or why not."""

from __future__ import annotations

import msgspec

from sandboxctl.events.lifecycle import LifecycleEvent
from sandboxctl.events.replies import ErrorCode


class Rejection(msgspec.Struct, frozen=True):
    code: ErrorCode
    message: str


Decision = list[LifecycleEvent] | Rejection
