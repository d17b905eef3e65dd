"""Driver facts: what a driver worker observed a real engine do.

Facts are not phases. The state machine decides what a fact means for the
sandbox (an exit while Stopping is a stop; an exit while Ready is a failure).
``incarnation`` names one run of a container (the engine's start time), so a
late fact from an earlier run can be recognised and ignored.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class _Fact(msgspec.Struct, kw_only=True, omit_defaults=True):
    container_id: str = ""
    # The sandbox id from the container's labels: a fact about a container of an
    # earlier sandbox that had the same name must not move the new one.
    sandbox_id: str = ""
    # The id of the log event (the work order: created, start or stop requested, ...) this fact
    # answers; empty for what a watcher or a reconciliation observed. An answer is news about
    # the engine after the request; an observation may be a late copy of something older.
    request_id: str = ""
    TYPE: ClassVar[str] = ""


class ContainerCreated(_Fact):
    TYPE: ClassVar[str] = "sandboxctl.fact.container_created.v1"


class ContainerStarted(_Fact):
    incarnation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.fact.container_started.v1"


class ContainerExited(_Fact):
    exit_code: int
    requested: bool = False
    oom: bool = False
    incarnation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.fact.container_exited.v1"


class ContainerPaused(_Fact):
    incarnation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.fact.container_paused.v1"


class ContainerResumed(_Fact):
    incarnation: str = ""
    TYPE: ClassVar[str] = "sandboxctl.fact.container_resumed.v1"


class WorkspaceArchived(_Fact):
    """The sandbox's workspace is stored as ``object`` (checked against ``digest``), and its
    container and volume are removed."""

    object: str
    digest: str
    size: int = 0
    TYPE: ClassVar[str] = "sandboxctl.fact.workspace_archived.v1"


class ContainerRemoved(_Fact):
    # True only from sandboxctl's own delete, once the workspace volume is gone too. A removal
    # seen by a watcher says nothing about the volume: taking it as the end of a delete would
    # free the name while the old workspace is still being removed, by name, under a new sandbox.
    workspace_removed: bool = False
    TYPE: ClassVar[str] = "sandboxctl.fact.container_removed.v1"


class DriverFailed(_Fact):
    operation: str
    message: str
    TYPE: ClassVar[str] = "sandboxctl.fact.driver_failed.v1"


class ContainerOrphaned(_Fact):
    """A managed container with no live sandbox in the log. It is reported, never deleted silently."""

    reason: str
    TYPE: ClassVar[str] = "sandboxctl.fact.container_orphaned.v1"


Fact = (
    ContainerCreated
    | ContainerStarted
    | ContainerExited
    | ContainerPaused
    | ContainerResumed
    | WorkspaceArchived
    | ContainerRemoved
    | DriverFailed
    | ContainerOrphaned
)
FACT_TYPES: dict[str, type[_Fact]] = {
    cls.TYPE: cls
    for cls in (
        ContainerCreated,
        ContainerStarted,
        ContainerExited,
        ContainerPaused,
        ContainerResumed,
        WorkspaceArchived,
        ContainerRemoved,
        DriverFailed,
        ContainerOrphaned,
    )
}
