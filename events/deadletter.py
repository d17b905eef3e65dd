"""A message that a consumer gave up on, kept where operators can see it.

The original stays in its stream; this record says which consumer gave up,
after how many deliveries, and why, so that one bad message never blocks the
sandboxes behind it and is never silently lost either.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class DeadLettered(msgspec.Struct, kw_only=True):
    consumer: str
    subject: str
    stream: str
    stream_seq: int
    deliveries: int
    reason: str
    payload: str  # the original bytes as text (replacement characters where they are not UTF-8), cut at 4 KiB
    time: str
    TYPE: ClassVar[str] = "sandboxctl.deadletter.v1"
