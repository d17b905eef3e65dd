"""Hosts: what a driver worker announces of the machine it runs on, so that the state machine can
place sandboxes (statemachine/placement.py) and tell when a host has gone away.

Each announcement is the value of the host's key in the hosts' key-value bucket
(``subjects.HOSTS_BUCKET``), JSON, rewritten by the worker's heartbeat. Only driver workers may
write there (docs/security.md); every field is bounded all the same, and an announcement that
does not decode is no host.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from sandboxctl.events import limits
from sandboxctl.events.commands import Driver, HostName, Labels

Engines = Annotated[list[Driver], msgspec.Meta(min_length=1, max_length=limits.HOST_ENGINES_MAX)]
Worker = Annotated[str, msgspec.Meta(max_length=limits.ACTOR_MAX)]
HEARTBEAT_DEFAULT = 30.0  # seconds
HEARTBEAT_MIN, HEARTBEAT_MAX = 1.0, 3600.0
Heartbeat = Annotated[float, msgspec.Meta(ge=HEARTBEAT_MIN, le=HEARTBEAT_MAX)]
HostCpus = Annotated[float, msgspec.Meta(gt=0, le=limits.CPUS_MAX * 64)]
HostMemory = Annotated[int, msgspec.Meta(gt=0, le=limits.MEMORY_MAX * 64)]
HostSandboxes = Annotated[int, msgspec.Meta(ge=1, le=limits.HOST_SANDBOXES_MAX)]
# How the host runs VM sandboxes: hardware-assisted (KVM) or emulated (TCG); "" with no vm engine.
Acceleration = Literal["", "kvm", "tcg"]


class HostAnnouncement(msgspec.Struct, kw_only=True, frozen=True):
    """A host as its driver worker announces it: its engines, its capacity and its labels.
    ``worker`` is the announcing installation's own id: a second worker that announces a host
    name a live worker holds is refused, so two machines never take each other's orders."""

    name: HostName
    worker: Worker
    engines: Engines
    cpus: HostCpus
    memory: HostMemory  # bytes
    max_sandboxes: HostSandboxes
    labels: Labels = {}
    # Seconds after which a host not heard from is lost; renewed every third of it.
    heartbeat: Heartbeat = HEARTBEAT_DEFAULT
    acceleration: Acceleration = ""
    TYPE: ClassVar[str] = "sandboxctl.host.announced.v1"


# A drained host's key beside its announcement: an operator's (``sandboxctl host drain``), which
# the host's own worker may not write; nothing new is placed there while it is set.
DRAIN_PREFIX = "drain."
# The key, per engine, naming the one host that took over the orders of the sandboxes placed on no
# host (before hosts): made once, by the first host of the engine whose worker starts.
UNPLACED_PREFIX = "unplaced."

_decode = msgspec.json.Decoder(HostAnnouncement).decode


def decode_host(data: bytes) -> HostAnnouncement:
    """An announcement, checked against every bound, its engines named once each; raises
    msgspec's errors otherwise."""
    host = _decode(data)
    if len(set(host.engines)) != len(host.engines):
        raise msgspec.ValidationError(f"host {host.name}: an engine is named twice in {host.engines}")
    return host


def encode_host(host: HostAnnouncement) -> bytes:
    return msgspec.json.encode(host)
