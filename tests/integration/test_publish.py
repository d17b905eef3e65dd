"""bus/publish.py against a real nats-server: the shared ack inbox must
keep ``js.publish``'s semantics (ack, dedupe, the server's errors, no stream,
timeouts) while many publishes are in flight on one connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError

from sandboxctl.bus import publish as publishing
from sandboxctl.bus.publish import publish
from sandboxctl.runtime.embedded import NatsServer

STREAM = "PUBTEST"


async def ignore(msg: Msg) -> None:
    """A subscriber that never answers: the server has someone to deliver to, so no 503."""


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    await conn.jetstream().add_stream(
        StreamConfig(name=STREAM, subjects=["pubtest.>"], storage=StorageType.FILE, duplicate_window=60.0)
    )
    yield conn
    await conn.close()


async def test_acks_come_back_to_their_own_publish_with_many_in_flight(nc: NATS) -> None:
    js = nc.jetstream()
    acks = await asyncio.gather(
        *(publish(js, f"pubtest.s{i % 50}", str(i).encode(), STREAM, {"Nats-Msg-Id": f"m-{i}"}) for i in range(500))
    )
    assert sorted(a.seq for a in acks) == list(range(1, 501))
    assert all(a.stream == STREAM and not a.duplicate for a in acks)
    for i in (0, 137, 499):  # each ack names the sequence its own message was stored at
        stored = await js.get_msg(STREAM, acks[i].seq)
        assert stored.data == str(i).encode()
    assert not publishing._inboxes[nc].waiting


async def test_a_repeated_message_id_is_acked_as_a_duplicate_of_the_first(nc: NATS) -> None:
    js = nc.jetstream()
    first = await publish(js, "pubtest.a", b"1", STREAM, {"Nats-Msg-Id": "same"})
    again = await publish(js, "pubtest.a", b"2", STREAM, {"Nats-Msg-Id": "same"})
    assert (first.duplicate, again.duplicate, again.seq) == (False, True, first.seq)
    assert (await js.stream_info(STREAM)).state.messages == 1


async def test_the_servers_refusal_is_raised_with_its_error_code(nc: NATS) -> None:
    js = nc.jetstream()
    await publish(js, "pubtest.b", b"1", STREAM, {"Nats-Msg-Id": "b1"})
    with pytest.raises(APIError) as refused:
        await publish(js, "pubtest.b", b"2", STREAM, {"Nats-Msg-Id": "b2", "Nats-Expected-Last-Subject-Sequence": "0"})
    assert refused.value.err_code == 10071  # wrong last sequence: what bus.eventlog turns into SequenceConflict
    with pytest.raises(APIError):  # the stream named is checked too
        await publish(js, "pubtest.b", b"3", "OTHER", {"Nats-Msg-Id": "b3"})


async def test_no_stream_and_no_ack_are_errors_not_hangs(nc: NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    js = nc.jetstream()
    with pytest.raises(NoStreamResponseError):
        await publish(js, "nostream.x", b"1", STREAM, {"Nats-Msg-Id": "x"})
    await nc.subscribe("silent.x", cb=ignore)
    monkeypatch.setattr(publishing, "SWEEP_EVERY", 0.05)
    started = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await publish(js, "silent.x", b"1", STREAM, {"Nats-Msg-Id": "y"}, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert not publishing._inboxes[nc].waiting
    # and the inbox still serves the next publish
    assert (await publish(js, "pubtest.c", b"1", STREAM, {"Nats-Msg-Id": "c"})).seq == 1


async def test_a_cancelled_publish_leaves_nothing_waiting(nc: NATS) -> None:
    js = nc.jetstream()
    await nc.subscribe("silent.y", cb=ignore)
    task = asyncio.create_task(publish(js, "silent.y", b"1", STREAM, {"Nats-Msg-Id": "z"}))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not publishing._inboxes[nc].waiting
