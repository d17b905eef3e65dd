"""The Python SDK for sandboxctl: ``SandboxClient`` sends commands and queries over NATS and
waits for phases, with a typed error per code. It speaks only the wire contract
(``sandboxctl.events``) through the NATS plumbing (``sandboxctl.bus``), and imports no service."""

from sandboxctl.client.errors import (
    ERRORS,
    EXIT_STATUS,
    AlreadyExists,
    ClientCode,
    Conflict,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    PhaseFailed,
    SandboxError,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
)
from sandboxctl.client.sdk import TERMINAL, Denials, SandboxClient, wait_verdict

__all__ = [
    "ERRORS",
    "EXIT_STATUS",
    "TERMINAL",
    "AlreadyExists",
    "ClientCode",
    "Conflict",
    "Denials",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutcomeUnknown",
    "PermissionDenied",
    "PhaseFailed",
    "SandboxClient",
    "SandboxError",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "wait_verdict",
]
