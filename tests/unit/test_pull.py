"""The durable pull reader's reading of a JetStream reply subject (sandboxctl.bus.tail), and its
wait for a delivery, without a server: the subject tells the stream and consumer sequences and
the delivery count, as nats-py reads them. The reader against a real nats-server is
tests/integration/test_pull.py."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.msg import Msg

from sandboxctl.bus.tail import deliveries, sequences, wait_for_delivery


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.SANDBOXCTL_LOG.c1.3.1042.77.1732890000000000000.5",
        "$JS.ACK._.ACCHASH.SANDBOXCTL_LOG.c1.3.1042.77.1732890000000000000.5.x9Zr",
        "$JS.ACK.hub.ACCHASH.SANDBOXCTL_LOG.c1.1.1042.77.1732890000000000000.0",
    ],
)
def test_sequences_reads_the_reply_subject_as_nats_py_does(reply: str) -> None:
    meta = Msg.Metadata._from_reply(reply)
    assert sequences(reply) == (meta.sequence.stream, meta.sequence.consumer) == (1042, 77)
    assert deliveries(Msg(None, reply=reply)) == meta.num_delivered  # type: ignore[arg-type]


async def test_a_reader_cancelled_just_as_a_delivery_arrives_stops() -> None:
    """Python 3.11's wait_for returns the delivery when the cancellation comes in the same turn of
    the loop, and swallows the cancellation: a reader loop that went on could never be stopped."""
    ready = asyncio.Event()

    async def reader() -> None:
        while True:
            await wait_for_delivery(ready, 5.0)

    for _ in range(20):
        task = asyncio.create_task(reader())
        await asyncio.sleep(0.01)
        ready.set()  # a delivery...
        task.cancel()  # ...and the stop, in the same turn
        await asyncio.wait({task}, timeout=2.0)
        assert task.cancelled(), "the reader went on after its cancellation"
