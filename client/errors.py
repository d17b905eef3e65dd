"""The client's errors: one type per code a service (``ErrorCode``) or the client itself
(``ClientCode``) reports, each with the exit status the CLI uses, so a code is added in one
place (``ERRORS``) and caught by its type (``except NotFound``)."""

from __future__ import annotations

import enum

from sandboxctl.events.replies import ErrorCode


class ClientCode(enum.StrEnum):
    """Codes the client reports itself, beside the services' ErrorCode: they describe what the
    client saw (or did not see), so no service ever sends them."""

    TIMEOUT = "timeout"  # the phase waited for did not come in time
    FAILED = "failed"  # the sandbox went to Error while waited for
    UNAUTHENTICATED = "unauthenticated"  # the NATS server did not accept the user and password


class SandboxError(Exception):
    """A rejected command or query, or what the client itself reports: ``code`` is one of
    events.replies.ErrorCode or ClientCode, and each code has a subclass (``except NotFound``)
    and an ``exit_status`` of its own, which the CLI exits with (ERRORS is the one table)."""

    code: str = ErrorCode.INTERNAL
    exit_status = 1  # for a code this client does not know

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @staticmethod
    def of(code: str, message: str, seq: int = 0) -> SandboxError:
        """The typed error for ``code``; an unknown code still gives a SandboxError. ``seq``: a
        conflict's current log sequence of the sandbox."""
        if code == ErrorCode.CONFLICT:
            return Conflict(message, seq)
        cls = _BY_CODE.get(code)
        return cls(message) if cls is not None else SandboxError(code, message)


class _Coded(SandboxError):
    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, message)


class InvalidArgument(_Coded):
    code = ErrorCode.INVALID_ARGUMENT
    exit_status = 2


class NotFound(_Coded):
    code = ErrorCode.NOT_FOUND
    exit_status = 3


class AlreadyExists(_Coded):
    code = ErrorCode.ALREADY_EXISTS
    exit_status = 4


class FailedPrecondition(_Coded):
    """The command does not fit the sandbox's phase, or a wait ended because the phase waited
    for can no longer come without another command (it was deleted, or stopped, meanwhile)."""

    code = ErrorCode.FAILED_PRECONDITION
    exit_status = 5


class Conflict(_Coded):
    """The sandbox moved while the command was decided: past the ``expected_seq`` it named (then
    ``seq`` is where it stands now: read it again and decide again), or so often that the state
    machine gave up deciding."""

    code = ErrorCode.CONFLICT
    exit_status = 6

    def __init__(self, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.seq = seq


class Internal(_Coded):
    code = ErrorCode.INTERNAL
    exit_status = 7


class Unavailable(_Coded):
    """The command certainly did nothing: no NATS, no service subscribed (no responders), the
    connection was closed before it went out, or the state machine answered that it cannot
    write the log. Safe to retry with the same command id.

    A query that got no answer in time is Unavailable too (a read changes nothing); a command
    that got none is OutcomeUnknown. ``maybe_delivered`` tells the two apart inside the client."""

    code = ErrorCode.UNAVAILABLE
    exit_status = 8

    def __init__(self, message: str, maybe_delivered: bool = False) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


class WaitTimeout(_Coded):
    code = ClientCode.TIMEOUT
    exit_status = 9


class PhaseFailed(_Coded):
    """The sandbox went to Error while the caller waited for another phase."""

    code = ClientCode.FAILED
    exit_status = 10


class PermissionDenied(_Coded):
    """The authenticated user lacks the role (the state machine's refusal, recorded in the audit
    stream), or the NATS server refused a subject the user's permissions do not allow."""

    code = ErrorCode.PERMISSION_DENIED
    exit_status = 11


class OutcomeUnknown(_Coded):
    """A command was sent and no answer came back (it timed out, or the connection was lost after
    it went out): the state machine may have applied it. ``command_id`` finds it in the log
    (its events' causationid), and a retry with that id is applied at most once."""

    code = ErrorCode.OUTCOME_UNKNOWN
    exit_status = 12

    def __init__(self, message: str, command_id: str = "") -> None:
        super().__init__(message)
        self.command_id = command_id


class Unauthenticated(_Coded):
    """The NATS server did not accept the user and password (wrong, or the user was removed).
    Not PermissionDenied: the server does not know who is asking, so no role is in question,
    and the fix is other credentials, not another role."""

    code = ClientCode.UNAUTHENTICATED
    exit_status = 13


# Every code with its exception type and exit status: the classes above are the one table (a
# new code is its ErrorCode member and its class here; tests/unit/test_client.py fails when a
# code has none), and the CLI's exit statuses are read from it.
ERRORS: tuple[type[_Coded], ...] = tuple(_Coded.__subclasses__())
_BY_CODE: dict[str, type[_Coded]] = {cls.code: cls for cls in ERRORS}
EXIT_STATUS: dict[str, int] = {cls.code: cls.exit_status for cls in ERRORS}
