"""Replies to commands and queries.

Every reply is either a success or carries an ``error`` with a stable ``code``
from ErrorCode and a one-line human message; clients branch on the code.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from sandboxctl.events.limits import NAME_MAX


class ErrorCode(enum.StrEnum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    CONFLICT = "conflict"
    INTERNAL = "internal"
    # The authenticated user lacks the role the command needs (docs/security.md).
    PERMISSION_DENIED = "permission_denied"
    # The log could not be read or written (JetStream away, its disk full): nothing was stored,
    # and a retry with the same command_id is safe.
    UNAVAILABLE = "unavailable"
    # The command went out and whether it was stored cannot be learnt now (an append whose ack
    # was lost while the log could not be asked): look it up by command_id, or retry with it.
    OUTCOME_UNKNOWN = "outcome_unknown"


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: ErrorCode
    message: str


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    accepted: bool  # always present: false on an error reply
    sandbox: str = ""
    phase: str = ""
    seq: int = 0
    appended: int = 0
    error: ErrorInfo | None = None
    result: Any = None
    # A query answered from a projection: the log sequence its answer reflects at least.
    position: int = 0


reply_decoder = msgspec.json.Decoder(Reply)


MAX_MESSAGE = 1000


def error_reply(code: ErrorCode, message: str, sandbox: str = "", seq: int = 0) -> Reply:
    """An error reply that always fits in a NATS message: parsers quote bad input back,
    and the input may be close to the max payload, so the message is cut and an
    over-long (so invalid) sandbox name is not echoed. ``seq``: a conflict's current
    log sequence of the sandbox."""
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return Reply(
        accepted=False,
        sandbox=sandbox if len(sandbox) <= NAME_MAX else "",
        seq=seq,
        error=ErrorInfo(code=code, message=message),
    )
