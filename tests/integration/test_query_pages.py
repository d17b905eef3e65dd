"""The query service answers every query, in replies that fit in a NATS message, however many
sandboxes there are and however large their rows: ``list`` and ``history`` come in pages, and a
reply that cannot be sent becomes an ``internal`` error that can.

The logs here are written straight into the log stream with plain nats-py (as an older version,
or a writer outside the bounds of events/limits.py, could have written them) and folded by a
real projector; the query service and SandboxClient read them over a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from bench.replay import fill
from sandboxctl.bus.streams import ensure_streams
from sandboxctl.client import Internal, InvalidArgument, SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, encode, new_id, now
from sandboxctl.events.lifecycle import (
    LifecycleEvent,
    SandboxCreated,
    SandboxDeleted,
    SandboxDeleteRequested,
    SandboxFailed,
)
from sandboxctl.events.limits import LABEL_KEY_MAX, LABEL_VALUE_MAX, LABELS_MAX, PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX
from sandboxctl.events.queries import PHASES_MAX
from sandboxctl.events.replies import reply_decoder
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer
from sandboxctl.services.query import REPLY_MARGIN
from sandboxctl.statemachine import Phase

IMAGE = "localhost/sandboxctl-busybox:latest"


@pytest.fixture
def reader_config(tmp_path: Path, nats_server: NatsServer) -> Config:
    """Only a projector and a query service run: the logs here are not meant for engines."""
    return Config(nats_url=nats_server.url, data_dir=tmp_path / "data", run_dir=tmp_path / "run", actor="test")


@pytest.fixture
async def nc(reader_config: Config) -> AsyncIterator[NATS]:
    conn = await nats.connect(reader_config.nats_url)
    await ensure_streams(conn.jetstream())
    yield conn
    await conn.close()


async def readers(config: Config) -> ControlPlane:
    plane = await ControlPlane(config, components=("projector", "query")).start()
    await asyncio.wait_for(plane.projector.caught_up.wait(), 120)
    return plane


async def append(nc: NATS, name: str, event: LifecycleEvent) -> int:
    """One event straight into the log, past the state machine and its bounds."""
    envelope = Envelope(id=new_id(), type=event.TYPE, source="test", subject=name, time=now(), data=event, actor="test")
    ack = await nc.jetstream().publish(subjects.log(name), encode(envelope), stream=subjects.LOG_STREAM)
    return int(ack.seq)


def created(labels: dict[str, str]) -> SandboxCreated:
    return SandboxCreated(sandbox_id=new_id(), image=IMAGE, driver="podman", labels=labels)


def widest_labels(tag: str) -> dict[str, str]:
    """As many labels as a create may carry, each key and value as long as allowed."""
    return {f"{tag}{k:03d}".ljust(LABEL_KEY_MAX, "k"): "v" * LABEL_VALUE_MAX for k in range(LABELS_MAX)}


async def ask(nc: NATS, kind: str, **request: Any) -> tuple[int, Any]:
    """A query with plain nats-py: the size of the reply as it came, and its result (or error)."""
    msg = await nc.request(subjects.query(kind), json.dumps(request).encode(), timeout=10)
    reply = reply_decoder.decode(msg.data)
    return len(msg.data), reply.result if reply.error is None else reply.error


async def append_many(nc: NATS, events: dict[str, LifecycleEvent]) -> None:
    """Many events of as many sandboxes, with their publishes in flight together."""
    js = nc.jetstream(publish_async_max_pending=1_000)
    acks = []
    for name, event in events.items():
        envelope = Envelope(id=new_id(), type=event.TYPE, source="test", subject=name, time=now(), data=event)
        acks.append(await js.publish_async(subjects.log(name), encode(envelope), stream=subjects.LOG_STREAM))
    await asyncio.gather(*acks)


async def test_a_hundred_thousand_sandboxes_list_in_pages_that_fit(reader_config: Config, nc: NATS) -> None:
    """100,000 small rows and 300 of the largest rows a create may make: every reply is under the
    max payload, pages are cut by count and by size, and the SDK returns every row once."""
    started = time.monotonic()
    await fill(nc, 100_000, 100_000)  # sbx-000000 ... sbx-099999, one SandboxCreated each
    await append_many(nc, {f"sbx-wide-{k:03d}": created(widest_labels(f"k{k}-")) for k in range(300)})
    filled = time.monotonic()
    plane = await readers(reader_config)
    try:
        folded = time.monotonic()
        expected = [f"sbx-{k:06d}" for k in range(100_000)] + [f"sbx-wide-{k:03d}" for k in range(300)]
        wide = len(encode(await get(nc, "sbx-wide-000")))
        assert 25_000 < wide < 30_000, wide

        # Plain nats-py, asking for the largest pages: every reply fits, and every page but the
        # last is cut by size, within one row of the limit.
        listed: list[str] = []
        sizes: list[int] = []
        after = ""
        while True:
            size, result = await ask(nc, "list", after=after, limit=PAGE_LIMIT_MAX)
            assert isinstance(result, dict), result
            sizes.append(size)
            listed += [item["name"] for item in result["items"]]
            after = result["next"]
            if not after:
                break
            assert after == listed[-1] and len(result["items"]) < PAGE_LIMIT_MAX
        assert listed == expected
        assert max(sizes) <= nc.max_payload, (max(sizes), nc.max_payload)
        assert min(sizes[:-1]) > nc.max_payload - REPLY_MARGIN - wide, sizes

        # The SDK follows the cursor: every row, once, in name order; pages of the default size
        # while the rows are small, and shorter ones once they are wide.
        client = await SandboxClient.connect(reader_config.nats_url, actor="test")
        try:
            rows = await client.list()
            assert [r["name"] for r in rows] == expected
            assert rows[-1]["labels"] == widest_labels("k299-")
            pages = [len(page) async for page in client.list_pages()]
            assert pages[: 100_000 // PAGE_LIMIT_DEFAULT] == [PAGE_LIMIT_DEFAULT] * (100_000 // PAGE_LIMIT_DEFAULT)
            assert sum(pages) == len(expected) and max(pages[100_000 // PAGE_LIMIT_DEFAULT :]) < 50, pages[-10:]
            assert [r["name"] for r in await client.list(labels={"team": "bench"})] == expected[:100_000]
            assert await client.list(phases=["Ready"]) == []
            assert (await client.summary())["phases"]["Provisioning"] == len(expected)
        finally:
            await client.close()
        print(
            f"\nlist: {len(expected)} sandboxes; fill {filled - started:.1f}s, fold {folded - filled:.1f}s, "
            f"list {time.monotonic() - folded:.1f}s; {len(sizes)} pages asked for {PAGE_LIMIT_MAX} rows each, "
            f"largest reply {max(sizes)} bytes of {nc.max_payload}"
        )
    finally:
        await plane.stop()


async def get(nc: NATS, name: str) -> Any:
    _, item = await ask(nc, "get", name=name)
    return item


async def test_rows_and_events_past_the_bounds_still_get_answers(reader_config: Config, nc: NATS) -> None:
    """Labels of about 600 KB each (the bug report's accepted create): list pages them one a page,
    a row larger than a reply is listed truncated and its get is an ``internal`` error that
    arrives, and a history larger than a reply comes in pages."""
    fat = {"blob": "x" * 600_000}
    await append(nc, "big-1", created(fat))
    await append(nc, "big-2", created(fat))
    await append(nc, "huge", created(fat))
    await append(nc, "huge", SandboxFailed(kind="driver", reason="r" * 600_000, operation="start"))
    await append(nc, "small", created({"team": "red"}))
    plane = await readers(reader_config)
    try:
        size, result = await ask(nc, "list")
        assert size <= nc.max_payload and [i["name"] for i in result["items"]] == ["big-1"]
        client = await SandboxClient.connect(reader_config.nats_url, actor="test")
        try:
            rows = {r["name"]: r for r in await client.list()}
            assert list(rows) == ["big-1", "big-2", "huge", "small"]
            assert rows["big-2"]["labels"] == fat and rows["small"]["labels"] == {"team": "red"}
            assert rows["huge"] == {
                "name": "huge", "sandbox_id": rows["huge"]["sandbox_id"], "phase": "Error", "driver": "podman",
                "host": "", "last_seq": 4, "updated_at": rows["huge"]["updated_at"], "truncated": True,
            }  # fmt: skip
            with pytest.raises(Internal, match="over the 1048576-byte max payload"):
                await client.get("huge")
            assert (await client.get("big-1"))["labels"] == fat
            history = await client.history("huge")
            assert [e["type"] for e in history] == [SandboxCreated.TYPE, SandboxFailed.TYPE]
            assert history[1]["data"]["reason"] == "r" * 600_000 and history[1]["phase"] == "Error"
            size, page = await ask(nc, "history", name="huge")
            assert size <= nc.max_payload and len(page["items"]) == 1 and page["next"] == 3
        finally:
            await client.close()
    finally:
        await plane.stop()


async def test_list_requests_are_checked(reader_config: Config, nc: NATS) -> None:
    await append(nc, "a-1", created({"team": "red"}))
    await append(nc, "a-2", created({"team": "blue"}))
    gone = created({"team": "red"})
    await append(nc, "a-0", gone)
    await append(nc, "a-0", SandboxDeleteRequested(sandbox_id=gone.sandbox_id, driver="podman"))
    await append(nc, "a-0", SandboxDeleted())
    plane = await readers(reader_config)
    try:
        _, error = await ask(nc, "list", phases=["Ready", "Bogus"])
        assert error.code == "invalid_argument" and "unknown phase 'Bogus'; phases are Provisioning, Ready" in (
            error.message
        )
        for request in (
            {"limit": 0},
            {"limit": PAGE_LIMIT_MAX + 1},
            {"labels": {"bad key": "x"}},
            {"labels": {"k": "v" * (LABEL_VALUE_MAX + 1)}},
            {"labels": {f"k{i}": "v" for i in range(LABELS_MAX + 1)}},
            {"after": "a.*"},
            {"phases": ["Ready"] * (PHASES_MAX + 1)},
        ):
            _, error = await ask(nc, "list", **request)
            assert error.code == "invalid_argument", (request, error)
        client = await SandboxClient.connect(reader_config.nats_url, actor="test")
        try:
            with pytest.raises(InvalidArgument, match="unknown phase 'Runing'"):
                await client.list(phases=["Runing"])
            assert [r["name"] for r in await client.list(phases=["Provisioning"], labels={"team": "blue"})] == ["a-2"]
            assert [len(p) async for p in client.list_pages(limit=1)] == [1, 1]
            # Deleted rows only when asked for (--all), and paged like the others.
            assert [r["name"] for r in await client.list()] == ["a-1", "a-2"]
            assert [r["name"] for r in await client.list(include_deleted=True)] == ["a-0", "a-1", "a-2"]
            assert [len(p) async for p in client.list_pages(include_deleted=True, limit=2)] == [2, 1]
            assert [r["name"] for r in await client.list(phases=["Deleted"], labels={"team": "red"})] == ["a-0"]
            _, page = await ask(nc, "list", limit=1, after="a-1")
            assert [i["name"] for i in page["items"]] == ["a-2"] and page["next"] == ""
            _, page = await ask(nc, "list")
            assert len(page["items"]) == 2 and page["next"] == "" and PAGE_LIMIT_DEFAULT >= 2
        finally:
            await client.close()
    finally:
        await plane.stop()


async def test_summary_counts_phases_and_names_the_latest_errors(reader_config: Config, nc: NATS) -> None:
    for k in range(60):
        await append(nc, f"e-{k:02d}", created({}))
        await append(nc, f"e-{k:02d}", SandboxFailed(kind="exited", reason=f"boom {k} " + "z" * 2000))
    await append(nc, "fine", created({}))
    plane = await readers(reader_config)
    try:
        size, summary = await ask(nc, "summary")
        assert summary["phases"] == {**dict.fromkeys((p.value for p in Phase), 0), "Provisioning": 1, "Error": 60}
        errors = summary["errors"]
        assert len(errors) == 50 and errors[0]["name"] == "e-59" and errors[0]["last_error"].startswith("boom 59 ")
        assert all(len(e["last_error"]) <= 512 for e in errors) and size < 64 * 1024
    finally:
        await plane.stop()


async def test_history_after_a_cursor_is_an_empty_last_page_but_no_sandbox_is_not_found(
    reader_config: Config, nc: NATS
) -> None:
    """Found by the poison suite: a history request with a cursor for a name that has no events
    at all answered an empty page, as if the sandbox existed."""
    await ensure_streams(nc.jetstream())
    await append(nc, "h-0", created({}))
    plane = await readers(reader_config)
    try:
        _, error = await ask(nc, "history", name="nobody", after=1)
        assert error.code == "not_found", error
        _, page = await ask(nc, "history", name="h-0", after=10**6)
        assert page["items"] == [] and page["next"] == 0
    finally:
        await plane.stop()
