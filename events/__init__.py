"""The wire contract of sandboxctl.

Everything that crosses NATS is defined here as msgspec Structs and encoded as
JSON, so that a client in any language can publish commands and read the log.
Nothing in this package performs I/O (but ``python -m sandboxctl.events.asyncapi``, which
writes the generated contract); every other package imports it.
"""

from typing import TYPE_CHECKING

from sandboxctl import lazy_exports

if TYPE_CHECKING:
    from sandboxctl.events.commands import (
        COMMAND_TYPES,
        AcquireLease,
        CreateSandbox,
        DeleteSandbox,
        PlaceStopHold,
        ReleaseLease,
        ReleaseStopHold,
        RenewLease,
        SandboxCommand,
        StartSandbox,
        StopSandbox,
        TouchSandbox,
        WarnSandbox,
    )
    from sandboxctl.events.envelope import Envelope, decode_envelope, encode, new_id, now
    from sandboxctl.events.facts import (
        FACT_TYPES,
        ContainerCreated,
        ContainerExited,
        ContainerOrphaned,
        ContainerRemoved,
        ContainerStarted,
        DriverFailed,
        Fact,
    )
    from sandboxctl.events.lifecycle import (
        EVENT_TYPES,
        LifecycleEvent,
        SandboxCreated,
        SandboxDeleted,
        SandboxDeleteRequested,
        SandboxFailed,
        SandboxReady,
        SandboxStartRequested,
        SandboxStopped,
        SandboxStopRequested,
    )
    from sandboxctl.events.replies import ErrorCode, ErrorInfo, Reply

__all__ = [
    "COMMAND_TYPES",
    "EVENT_TYPES",
    "FACT_TYPES",
    "AcquireLease",
    "ContainerCreated",
    "ContainerExited",
    "ContainerOrphaned",
    "ContainerRemoved",
    "ContainerStarted",
    "CreateSandbox",
    "DeleteSandbox",
    "DriverFailed",
    "Envelope",
    "ErrorCode",
    "ErrorInfo",
    "Fact",
    "LifecycleEvent",
    "PlaceStopHold",
    "ReleaseLease",
    "ReleaseStopHold",
    "RenewLease",
    "Reply",
    "SandboxCommand",
    "SandboxCreated",
    "SandboxDeleteRequested",
    "SandboxDeleted",
    "SandboxFailed",
    "SandboxReady",
    "SandboxStartRequested",
    "SandboxStopRequested",
    "SandboxStopped",
    "StartSandbox",
    "StopSandbox",
    "TouchSandbox",
    "WarnSandbox",
    "decode_envelope",
    "encode",
    "new_id",
    "now",
]

__getattr__, __dir__ = lazy_exports(__name__)
