"""A host name is held by one live installation, against a real nats-server: whether the holder
is alive is watched on this machine's clock, so a clock that disagrees with the server's (skew)
neither lets a live holder's name be taken nor keeps a dead holder's."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from nats.aio.client import Client as NATS

from sandboxctl.bus import hosts
from sandboxctl.bus.hosts import Announcer, HostTaken
from sandboxctl.events.hosts import HostAnnouncement

WINDOW = 2.0  # seconds: the heartbeat window of the hosts here


def announced(worker: str) -> HostAnnouncement:
    return HostAnnouncement(
        name="host-x", worker=worker, engines=["podman"], cpus=2, memory=2**30, max_sandboxes=4, heartbeat=WINDOW
    )


@pytest.mark.parametrize("skew", [-3600.0, 3600.0], ids=["clock-behind", "clock-ahead"])
async def test_a_live_holders_name_is_refused_whatever_this_machines_clock_says(
    nc: NATS, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    holder = Announcer(nc.jetstream(), announced("installation-a"))
    await holder.claim()
    holder.start()
    try:
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + skew)  # this machine's clock is an hour off
        began = time.monotonic()
        with pytest.raises(HostTaken, match="held by worker installation-a"):
            await Announcer(nc.jetstream(), announced("installation-b")).claim()
        assert time.monotonic() - began <= WINDOW  # the holder renews every third of its window
    finally:
        await holder.stop()


async def test_a_name_whose_holder_renews_nothing_for_its_window_is_taken_over(nc: NATS) -> None:
    gone = Announcer(nc.jetstream(), announced("installation-a"))
    await gone.claim()  # and never renewed: its machine went away
    began = time.monotonic()
    taker = Announcer(nc.jetstream(), announced("installation-b"))
    await taker.claim()
    assert WINDOW <= time.monotonic() - began <= WINDOW + 2.0  # watched for a whole window first
    taker.start()
    try:
        await asyncio.sleep(WINDOW / 2)
        # the old holder's return finds the name renewed by the new one: refused
        with pytest.raises(HostTaken, match="held by worker installation-b"):
            await Announcer(nc.jetstream(), announced("installation-a")).claim()
        kv = await hosts.hosts_bucket(nc.jetstream())
        assert b"installation-b" in (await kv.get("host-x")).value
    finally:
        await taker.stop()


async def test_the_same_installation_takes_its_name_back_at_once(nc: NATS) -> None:
    await Announcer(nc.jetstream(), announced("installation-a")).claim()
    began = time.monotonic()
    await Announcer(nc.jetstream(), announced("installation-a")).claim()  # a restart
    assert time.monotonic() - began < 1.0


async def test_a_name_the_servers_own_stamps_show_stale_is_taken_over_at_once(nc: NATS) -> None:
    await Announcer(nc.jetstream(), announced("installation-a")).claim()  # never renewed
    await asyncio.sleep(WINDOW + 0.5)
    other = HostAnnouncement(**{**msgspec.structs.asdict(announced("installation-c")), "name": "host-y"})
    await Announcer(nc.jetstream(), other).claim()  # the bucket's newest entry: a window after host-x's
    began = time.monotonic()
    await Announcer(nc.jetstream(), announced("installation-b")).claim()
    assert time.monotonic() - began < 1.0  # no window watched: the server's stamps tell
