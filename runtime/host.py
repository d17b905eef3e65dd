"""The host a process's driver workers run on, announced as a service of its own.

``up`` and ``serve`` add it after the driver workers, once their consumers exist, so nothing is
placed on the host before its workers can take it. A name another live installation holds is
refused: the service fails to start, says who holds it, and is tried again by the supervisor
(the holder may be this machine's last run, whose heartbeat has not lapsed yet).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from nats.aio.client import Client as NATS

from sandboxctl.bus.hosts import Announcer
from sandboxctl.events.hosts import HostAnnouncement
from sandboxctl.runtime.config import Config


def installation_id(data_dir: Path) -> str:
    """This installation's own id, kept in its data directory: the same across restarts, so a
    restarted worker takes its host name back at once; another machine's differs."""
    path = data_dir / "host-id"
    try:
        known = path.read_text().strip()
        if known:
            return known
    except FileNotFoundError:
        pass
    made = uuid.uuid4().hex
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(made + "\n")
    return made


def machine_memory() -> int:
    """Bytes of memory this machine has."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def announcement(config: Config, engines: list[str]) -> HostAnnouncement:
    return HostAnnouncement(
        name=config.host,
        worker=installation_id(config.data_dir),
        engines=sorted(engines),
        cpus=config.host_cpus or float(os.cpu_count() or 1),
        memory=config.host_memory or machine_memory(),
        max_sandboxes=config.host_max_sandboxes,
        labels=config.host_labels,
        heartbeat=config.heartbeat,
    )


class HostService:
    """Announces the host and renews it (bus.hosts.Announcer), as a supervised service."""

    def __init__(self, nc: NATS, host: HostAnnouncement, replicas: int | None = None) -> None:
        self.nc = nc
        self.announcer = Announcer(nc.jetstream(), host, replicas)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.announcer.claim()
        self.announcer.start()
        assert self.announcer.task is not None
        self.tasks.append(self.announcer.task)

    async def stop(self) -> None:
        await self.announcer.stop()
