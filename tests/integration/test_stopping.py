"""A service stops when asked, even when a cancellation is swallowed on the way: Python 3.11's
``wait_for`` (which nats-py's requests use) returns a result that came in the same turn as the
cancellation and drops the cancellation. Each loop that runs until its task is cancelled checks
for it at every turn (bus.tail.reraise_if_cancelling); without that, ``stop`` waited for ever.
A real nats-server; the swallowing is made deterministic by a lease that swallows as wait_for
does."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from sandboxctl.services.reaper import Reaper
from sandboxctl.services.statemachine import StateMachineService


async def swallowing(result: bool) -> bool:
    """A request that is answered in the same turn as the cancellation that comes while it waits,
    as 3.11's wait_for gives it: the result, and no cancellation."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass
    return result


async def test_a_reaper_stops_though_its_lease_swallowed_the_cancellation(nc: NATS) -> None:
    reaper = Reaper(nc, grace=1.0, interval=0.01)
    await reaper.start()
    reaper.lease.hold = lambda: swallowing(True)  # type: ignore[method-assign]
    await asyncio.sleep(0.1)
    await asyncio.wait_for(reaper.stop(), 5)


async def test_a_state_machine_stops_though_its_snapshot_lease_swallowed_the_cancellation(nc: NATS) -> None:
    machine = StateMachineService(nc, snapshot_every=0, snapshot_check=0.01)
    await machine.start()
    machine.snapshot_lease.hold = lambda: swallowing(False)  # type: ignore[method-assign]
    await asyncio.sleep(0.1)
    await asyncio.wait_for(machine.stop(), 10)
