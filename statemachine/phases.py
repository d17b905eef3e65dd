"""Sandbox phases. Values are readable words because they appear on the wire."""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    PROVISIONING = "Provisioning"
    READY = "Ready"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    STARTING = "Starting"
    PAUSING = "Pausing"
    PAUSED = "Paused"  # frozen by the engine: memory kept, no CPU used
    RESUMING = "Resuming"
    COMPLETED = "Completed"  # a job: its main process exited 0 on its own
    ARCHIVING = "Archiving"
    ARCHIVED = "Archived"  # its workspace is in the object store; no container, no volume
    ERROR = "Error"
    DELETING = "Deleting"
    DELETED = "Deleted"


# A sandbox that has never been created (or whose name is free again) has no
# phase on the wire; the machine still needs a source state for "create".
ABSENT = "Absent"

# Phases in which the sandbox is waiting on a driver; nothing else may move it
# except the driver's answer or a delete.
TRANSIENT = frozenset(
    {
        Phase.PROVISIONING,
        Phase.STOPPING,
        Phase.STARTING,
        Phase.PAUSING,
        Phase.RESUMING,
        Phase.ARCHIVING,
        Phase.DELETING,
    }
)
