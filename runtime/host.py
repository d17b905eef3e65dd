"""The host a process's driver workers run on, announced as a service of its own.

``up`` and ``serve`` add it before the driver workers: a name another live installation holds is
refused (the plane does not start, and says who holds it) before any worker takes an order, and
the workers' consumers start where the log ended when the host was announced, so no order placed
on the host comes before them. A name lost later (another installation took it over after this
one's heartbeat lapsed) ends the service, which its supervisor restarts, refused while the other
holds it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from sandboxctl.bus.hosts import Announcer
from sandboxctl.drivers.vm.accel import Accel
from sandboxctl.events import subjects
from sandboxctl.events.hosts import HostAnnouncement, decode_host, encode_host
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


def vm_acceleration(config: Config) -> tuple[Accel, str]:
    """How this host runs VM sandboxes ("kvm" or "tcg") and why (drivers.vm.accel)."""
    from sandboxctl.drivers.vm.accel import detect

    return detect(config.vm_acceleration)


def announcement(config: Config, engines: list[str]) -> HostAnnouncement:
    """The host this process announces, checked against the contract's bounds as any reader will."""
    host = HostAnnouncement(
        name=config.host,
        worker=installation_id(config.data_dir),
        engines=sorted(engines),
        cpus=config.host_cpus or float(os.cpu_count() or 1),
        memory=config.host_memory or machine_memory(),
        max_sandboxes=config.host_max_sandboxes,
        labels=config.host_labels,
        heartbeat=config.heartbeat,
        acceleration=vm_acceleration(config)[0] if "vm" in engines else "",
    )
    try:
        return decode_host(encode_host(host))
    except msgspec.ValidationError as exc:
        raise ValueError(f"host {config.host}: {exc}") from None


class HostService:
    """Announces the host and renews it (bus.hosts.Announcer), as a supervised service."""

    def __init__(self, nc: NATS, host: HostAnnouncement, replicas: int | None = None) -> None:
        self.nc = nc
        self.announcer = Announcer(nc.jetstream(), host, replicas)
        self.tasks: list[asyncio.Task[None]] = []
        self.first_seq = 0  # the log's end when the host was announced: where its workers start

    async def start(self) -> None:
        try:
            self.first_seq = (await self.nc.jetstream().stream_info(subjects.LOG_STREAM)).state.last_seq + 1
        except NotFoundError:
            self.first_seq = 1  # no log yet: the state machine makes it
        await self.announcer.claim()
        self.announcer.start()
        assert self.announcer.task is not None
        self.tasks.append(self.announcer.task)

    async def stop(self) -> None:
        await self.announcer.stop()
