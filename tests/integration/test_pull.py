"""sandboxctl.bus.pull.Pull against a real nats-server: the durable pull reader the
state machine (facts) and the driver workers (work orders) read with. Every
message must come, in order, once it is acknowledged never again, and the
reader must survive its consumer being deleted. Its reading of reply subjects is
tests/unit/test_pull.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from sandboxctl.bus.pull import Pull
from sandboxctl.runtime.embedded import NatsServer

STREAM, DURABLE = "PULLTEST", "pull-test"


def config(ack_wait: float = 30.0) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        filter_subject="pulltest.>",
    )


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    await conn.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["pulltest.>"], storage=StorageType.FILE))
    yield conn
    await conn.close()


async def publish(nc: NATS, first: int, count: int) -> None:
    js = nc.jetstream()
    for i in range(first, first + count):
        await js.publish(f"pulltest.s{i % 7}", str(i).encode(), stream=STREAM)


@contextlib.asynccontextmanager
async def reading(
    js: JetStreamContext, ack_wait: float = 30.0, keep_alive: bool = False
) -> AsyncIterator[AsyncIterator[list[Msg]]]:
    """One reader's batches, used across ``read`` calls, and the reader closed at the end."""
    pull = Pull(js, STREAM, config(ack_wait), keep_alive=keep_alive)
    try:
        yield pull.batches()
    finally:
        await pull.close()


async def read(
    batches: AsyncIterator[list[Msg]], count: int, ack: bool = True, timeout: float = 20.0, through: int = -1
) -> list[Msg]:
    """The next ``count`` messages from one reader's batches (it is used across calls), or fewer
    if the message numbered ``through`` comes first."""
    got: list[Msg] = []

    async def run() -> None:
        async for msgs in batches:
            for msg in msgs:
                got.append(msg)
                if ack:
                    await msg.ack()
            if len(got) >= count or any(int(m.data) == through for m in msgs):
                return

    await asyncio.wait_for(run(), timeout)
    return got


async def test_every_message_comes_in_order_across_many_requests(nc: NATS) -> None:
    await publish(nc, 0, 700)  # more than two requests' worth (batch 256) already waiting
    async with reading(nc.jetstream()) as batches:
        got = await read(batches, 700)
        later = asyncio.create_task(read(batches, 50))
        await asyncio.sleep(0.2)  # the reader is waiting on an open request when these arrive
        await publish(nc, 700, 50)
        got += await later
    assert [int(m.data) for m in got] == list(range(750))
    # An ack is a plain publish, which the server applies on its own time: ask until it has.
    for _ in range(50):
        info = await nc.jetstream().consumer_info(STREAM, DURABLE)
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.05)
    assert info.num_ack_pending == 0 and info.num_pending == 0 and info.delivered.stream_seq == 750


async def test_what_was_not_acknowledged_comes_again_and_what_was_does_not(nc: NATS) -> None:
    await publish(nc, 0, 10)
    async with reading(nc.jetstream(), ack_wait=1.0) as batches:
        first = await read(batches, 10, ack=False)
        for msg in first[:5]:
            await msg.ack()
        again = await read(batches, 5)  # after the ack wait, the five left unacknowledged
    assert [int(m.data) for m in again] == [5, 6, 7, 8, 9]
    assert all(m.metadata.num_delivered == 2 for m in again)


async def test_a_batch_kept_alive_is_not_delivered_again_while_it_is_worked_on(nc: NATS) -> None:
    """A short ack wait redelivers soon what a reader that died was given; keep_alive makes sure
    it never redelivers what a live reader is still working on, however long that takes."""
    await publish(nc, 0, 4)
    async with reading(nc.jetstream(), ack_wait=1.0, keep_alive=True) as batches:
        batch = await anext(batches)
        assert [int(m.data) for m in batch] == [0, 1, 2, 3]
        await batch[0].ack()  # settled: no longer kept alive
        await asyncio.sleep(3.5)  # working it, for three ack waits and more
        for msg in batch[1:]:
            await msg.ack()
        info = await nc.jetstream().consumer_info(STREAM, DURABLE)
        assert info.delivered.consumer_seq == 4 and info.num_redelivered == 0, info
        # Once the batch is done with, nothing is kept alive: one left unacknowledged comes again.
        await publish(nc, 4, 1)
        (late,) = await read(batches, 1, ack=False)
        again = await read(batches, 1)
    assert int(late.data) == 4 and int(again[0].data) == 4 and again[0].metadata.num_delivered == 2


async def test_a_deleted_consumer_is_made_again_and_reading_goes_on(nc: NATS) -> None:
    js = nc.jetstream()
    await publish(nc, 0, 3)
    async with reading(js) as batches:
        await read(batches, 3)
        waiting = asyncio.create_task(read(batches, 5, through=4))
        await asyncio.sleep(0.3)  # its request is open on the consumer about to go
        await js.delete_consumer(STREAM, DURABLE)
        await asyncio.sleep(0.3)
        await publish(nc, 3, 2)
        # A consumer made again starts over (DeliverPolicy.ALL): all five, the two new ones last.
        # One made again in the moment the server is still deleting it may take up the state of
        # the one deleted: then only the two new ones come. Either way, reading goes on.
        got = [int(m.data) for m in await waiting]
        assert got in ([0, 1, 2, 3, 4], [3, 4]), got
    assert (await js.consumer_info(STREAM, DURABLE)).config.filter_subject == "pulltest.>"


async def test_a_consumer_deleted_while_no_request_was_open_is_made_again(
    nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted between requests (say, while the reader was cut off), the consumer answers the
    next request only with a 503 "no responders": the reader must make it again, not wait on."""
    monkeypatch.setattr(Pull, "EXPIRES", 0.5)
    monkeypatch.setattr(Pull, "HEARTBEAT", 0.1)  # the server refuses a heartbeat over half the expiry
    js = nc.jetstream()
    await publish(nc, 0, 3)
    async with reading(js) as batches:
        await read(batches, 3)
        await asyncio.sleep(1.0)  # not reading: its request expires, and none is open
        await js.delete_consumer(STREAM, DURABLE)
        await publish(nc, 3, 2)
        assert [int(m.data) for m in await read(batches, 5, timeout=10)] == [0, 1, 2, 3, 4]


async def test_reading_goes_on_after_the_server_restarts(nats_server: NatsServer) -> None:
    """A server killed outright tells no open request that it ends (one stopped gracefully
    answers 409), and its restart loses the request (the consumer is on file, the request
    is not): its heartbeats stop, and the reader must ask again rather than wait for ever."""
    conn = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = conn.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["pulltest.>"], storage=StorageType.FILE))
        await publish(conn, 0, 2)
        async with reading(js) as batches:
            await read(batches, 2)
            waiting = asyncio.create_task(read(batches, 2, timeout=30))
            await asyncio.sleep(0.3)
            assert nats_server.proc is not None
            nats_server.proc.kill()
            nats_server.proc.wait()
            nats_server.start()
            for _ in range(100):  # until the client is back and JetStream answers
                try:
                    await js.stream_info(STREAM)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            await publish(conn, 2, 2)
            assert [int(m.data) for m in await waiting] == [2, 3]
    finally:
        await conn.close()
