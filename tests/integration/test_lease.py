"""bus/lease.py on a real nats-server: one holder at a time, the lease passes on once its holder
stops renewing it (its entry expires) or gives it up, and a holder never believes it holds a
lease another has taken."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from sandboxctl.bus.lease import Lease

TTL = 1.5


async def test_one_holder_at_a_time_and_a_dead_holders_lease_passes_on_after_its_ttl(nc: NATS) -> None:
    js = nc.jetstream()
    first, second = Lease(js, "reaper", "first", ttl=TTL), Lease(js, "reaper", "second", ttl=TTL)
    assert await first.hold()
    assert not await second.hold()
    for _ in range(6):  # renewed over several TTLs, never lost to the other
        await asyncio.sleep(TTL / 3)
        assert await first.hold()
        assert not await second.hold()
    # first dies (stops renewing): within a TTL it no longer counts itself the holder, and once
    # its entry has expired the other takes the lease
    await asyncio.sleep(TTL / 3)
    assert not first.held
    taken = False
    for _ in range(40):
        if await second.hold():
            taken = True
            break
        await asyncio.sleep(0.1)
    assert taken
    assert not await first.hold()  # it came back: the lease is the other's now


async def test_a_holder_that_stops_cleanly_hands_the_lease_on_at_once(nc: NATS) -> None:
    js = nc.jetstream()
    first, second = Lease(js, "reaper", "first", ttl=60), Lease(js, "reaper", "second", ttl=60)
    assert await first.hold()
    assert not await second.hold()
    await first.release()
    assert await second.hold()
    assert not await first.hold()
