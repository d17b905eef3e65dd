"""The archived workspaces' bucket on a real nats-server: an object is whole when the stream holds
every chunk its metadata counts, and the chunks of a put that never finished (a worker killed in
the middle of an archive) are purged once old enough, never an object's own nor a recent put's."""

from __future__ import annotations

import os
import time

from nats.aio.client import Client as NATS

from sandboxctl.bus.streams import chunks_stored, purge_orphan_chunks, workspaces
from sandboxctl.events import subjects

ORPHAN = f"$O.{subjects.WORKSPACES_BUCKET}.C.cutshort0000000000000"  # a put's chunks, no metadata


async def test_chunks_of_a_put_never_finished_are_purged_once_old_and_objects_are_kept(nc: NATS) -> None:
    js = nc.jetstream()
    store = await workspaces(js)
    data = os.urandom(300_000)  # three chunks of nats-py's 128 KiB
    info = await store.put("box/id-1", data)
    assert info.nuid and info.chunks == 3
    assert await chunks_stored(js, info.nuid) == 3
    for _ in range(2):
        await js.publish(ORPHAN, b"x" * 1000)
    # too recent: it may be a put under way
    assert await purge_orphan_chunks(js, older_than=3600) == []
    assert await chunks_stored(js, "cutshort0000000000000") == 2
    # old enough: purged, and only it
    assert await purge_orphan_chunks(js, older_than=60, now=time.time() + 120) == ["cutshort0000000000000"]
    assert await chunks_stored(js, "cutshort0000000000000") == 0
    assert await chunks_stored(js, info.nuid) == 3
    assert (await store.get("box/id-1")).data == data
    # an object whose chunks were lost is told apart from a whole one
    await js.purge_stream(subjects.WORKSPACES_STREAM, subject=f"$O.{subjects.WORKSPACES_BUCKET}.C.{info.nuid}")
    assert await chunks_stored(js, info.nuid) == 0 != (await store.get_info("box/id-1")).chunks


async def test_an_empty_bucket_has_nothing_to_purge(nc: NATS) -> None:
    js = nc.jetstream()
    await workspaces(js)
    assert await purge_orphan_chunks(js, older_than=0) == []
    await js.publish(ORPHAN, b"x")
    assert await purge_orphan_chunks(js, older_than=0, now=time.time() + 1) == ["cutshort0000000000000"]
