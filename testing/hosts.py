"""A host announced for a plane that decides but runs nothing (no driver worker): the state
machine places its creates there, and nothing ever works them. For tests of the control plane's
decisions and for benchmarks of placement, named as such; a host's real announcement is
runtime/host.py's, made by the process that runs its driver workers."""

from __future__ import annotations

from typing import Any

import nats

from sandboxctl.bus.hosts import hosts_bucket
from sandboxctl.events.hosts import HostAnnouncement, encode_host

SIMULATED_HEARTBEAT = 3600.0  # never renewed: alive for the test's whole life


async def announce_host(
    url: str, name: str, engines: tuple[str, ...] = ("podman", "docker"), max_sandboxes: int = 10_000, **options: Any
) -> HostAnnouncement:
    """Announce host ``name`` with ``engines`` once, as a worker would (``options``: how to connect)."""
    nc = await nats.connect(url, **options)
    try:
        host = HostAnnouncement(
            name=name,
            worker=f"simulated-{name}",
            engines=list(engines),
            cpus=64.0,
            memory=256 << 30,
            max_sandboxes=max_sandboxes,
            heartbeat=SIMULATED_HEARTBEAT,
        )
        await (await hosts_bucket(nc.jetstream())).put(name, encode_host(host))
        return host
    finally:
        await nc.close()
