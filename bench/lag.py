"""Projection lag: p99 delay from append to queryable, under a steady 5,000 events/s.

Lifecycle events are appended straight to the log at a paced 5,000/s for 20 s,
round-robin over 1,000 sandboxes so that each sandbox's events form a valid
history (created, ready, then stop_requested, stopped, start_requested, ready,
over and over) that the projector folds without complaint. The projector runs
in a process of its own, as in a deployment with its own SQLite file.

When is a row queryable? The projector publishes a core-NATS notice on
``sandboxctl.projected.<name>`` as it folds the batch that changed the row, while
the SQLite transaction that writes it commits; that is what the client's
``wait_for`` relies on, and a query that asks for at least the notice's position
(``at_least``, as a client does after its wait) waits for the commit. So the lag
of an event is taken from the moment its publish-ack arrives to the moment a
notice for its sandbox with a sequence at or past it arrives. It costs nothing to
observe, whereas polling SQLite would either miss the moment by its polling
interval or load a 2-core machine with the polling itself. A sample of notices is
checked against SQLite once the query service's patience with a projector behind
(``READ_PATIENCE``) has passed, to show the row is there for any query by then.

Events of one sandbox in ten are sampled (every event of those sandboxes), so
the load generator subscribes to 100 subjects rather than all of them.

Baseline, in the same run: the same paced load on a stream of its own, read by
the same log reader (``sandboxctl.bus.tail.Tail``) in a process of its own that only
publishes a notice per sandbox per batch; no decoding, folding or SQLite.

Usage: ``python -m bench.lag [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import PubAck, StorageType, StreamConfig

from bench.common import nats as nats_server
from bench.common import parser, percentiles, save, workdir
from bench.throughput import Child, say, until_told_to_stop
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, encode, now, type_name
from sandboxctl.events.lifecycle import (
    LifecycleEvent,
    SandboxCreated,
    SandboxReady,
    SandboxStartRequested,
    SandboxStopped,
    SandboxStopRequested,
)
from sandboxctl.services.query import READ_PATIENCE

TARGET_P99_MS = 50.0
SAMPLE_EVERY = 10  # one sandbox in this many is timed
VERIFY_EVERY = 50  # one timed notice in this many is checked against SQLite
RAW_STREAM = "BENCH_LAG_RAW"
RAW_SUBJECTS = "benchlag.raw"
RAW_NOTICES = "benchlag.seen"

log = logging.getLogger(__name__)


# -- the load -------------------------------------------------------------------------


def event_at(name: str, step: int) -> LifecycleEvent:
    """The ``step``-th event of a sandbox's history, which is valid at every step."""
    sandbox_id = f"{name}-id"
    if step == 0:
        return SandboxCreated(sandbox_id=sandbox_id, image="localhost/sandboxctl-busybox:latest", driver="fake")
    if step == 1:
        return SandboxReady(incarnation="1")
    match (step - 2) % 4:
        case 0:
            return SandboxStopRequested(sandbox_id=sandbox_id, driver="fake")
        case 1:
            return SandboxStopped(exit_code=0)
        case 2:
            return SandboxStartRequested(sandbox_id=sandbox_id, driver="fake")
        case _:
            return SandboxReady(incarnation=str(step))


def envelope_at(name: str, step: int) -> bytes:
    event = event_at(name, step)
    return encode(
        Envelope(
            id=f"{name}:{step}",
            type=type_name(type(event)),
            source="sandboxctl/statemachine",
            subject=name,
            time=now(),
            data=event,
            actor="bench",
            correlationid=f"{name}:{step}",
            causationid=f"{name}:{step}",
        )
    )


class Notice(msgspec.Struct):
    name: str
    seq: int


_notice_decoder = msgspec.json.Decoder(Notice)


class Probe:
    """Publishes paced events and times sampled ones from publish-ack to notice."""

    def __init__(self, nc: NATS, names: list[str], sampled: set[str], db: Path | None) -> None:
        self.nc = nc
        self.js = nc.jetstream(publish_async_max_pending=20_000)
        self.names = names
        self.sampled = sampled
        self.db = db
        self.pending: dict[str, deque[tuple[int, float]]] = {name: deque() for name in sampled}
        self.reached: dict[str, int] = dict.fromkeys(sampled, 0)
        self.lags: list[float] = []
        self.before_ack = 0  # notice handled before the ack: counted as lag 0
        self.verified = 0
        self.unverified: list[str] = []
        self.checks = 0  # notices whose row is still to be looked for in SQLite
        self.failed = 0

    async def watch(self, prefix: str) -> None:
        for name in self.sampled:
            await self.nc.subscribe(f"{prefix}.{name}", cb=self._on_notice)

    def _acked(self, name: str, future: asyncio.Future[PubAck]) -> None:
        at = time.perf_counter()
        if future.exception() is not None:
            self.failed += 1
            return
        seq = future.result().seq
        if self.reached[name] >= seq:
            self.before_ack += 1
            self.lags.append(0.0)
        else:
            self.pending[name].append((seq, at))

    async def _on_notice(self, msg: Msg) -> None:
        at = time.perf_counter()
        notice = _notice_decoder.decode(msg.data)
        name = notice.name
        self.reached[name] = max(self.reached[name], notice.seq)
        waiting = self.pending[name]
        resolved = False
        while waiting and waiting[0][0] <= notice.seq:
            self.lags.append(at - waiting.popleft()[1])
            resolved = True
        if resolved and self.db is not None and len(self.lags) % VERIFY_EVERY == 0:
            self.checks += 1
            asyncio.get_running_loop().call_later(READ_PATIENCE, self._verify, name, notice.seq)

    def _verify(self, name: str, seq: int) -> None:
        """Is the row queryable by the time a query that asks for it would give up waiting
        (``READ_PATIENCE`` after its notice)? A read as the query service would do it."""
        assert self.db is not None
        try:
            with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as db:
                row = db.execute("SELECT last_seq FROM sandboxes WHERE name = ?", (name,)).fetchone()
        finally:
            self.checks -= 1
        if row is not None and row[0] >= seq:
            self.verified += 1
        else:
            self.unverified.append(f"{name}: notice seq {seq}, row {row}")

    async def publish(self, prefix: str, rate: float, seconds: float) -> dict[str, Any]:
        """Append ``rate`` events per second for ``seconds``, paced on a fixed schedule, not in bursts."""
        total = int(rate * seconds)
        sandboxes = len(self.names)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                name = self.names[sent % sandboxes]
                payload = envelope_at(name, sent // sandboxes)
                future = await self.js.publish_async(f"{prefix}.{name}", payload, headers={"Nats-Msg-Id": f"{sent}"})
                if name in self.sampled:
                    future.add_done_callback(lambda f, name=name: self._acked(name, f))
                sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
        await self.js.publish_async_completed()
        elapsed = time.perf_counter() - start
        return {"events": sent, "publish_s": elapsed, "events_per_s": sent / elapsed}

    async def drain(self, timeout: float) -> None:
        """Wait for every timed event's notice."""
        deadline = time.perf_counter() + timeout
        while any(self.pending.values()) or self.checks:
            if time.perf_counter() > deadline:
                left = sum(len(q) for q in self.pending.values())
                raise RuntimeError(f"{left} sampled events never became queryable within {timeout}s")
            await asyncio.sleep(0.05)

    def result(self) -> dict[str, Any]:
        if self.failed:
            raise RuntimeError(f"{self.failed} sampled appends failed")
        return {**percentiles(self.lags), "before_ack": self.before_ack}


# -- the processes measured ----------------------------------------------------------


async def serve_projector(url: str, db: Path) -> None:
    from sandboxctl.services.projector import Projector

    nc = await nats.connect(url, name="bench-projector")
    projector = Projector(nc, db)
    await projector.start()
    say(ready=True, pid=os.getpid())
    try:
        await until_told_to_stop()
    finally:
        await projector.stop()
        await nc.close()


async def serve_reader(url: str) -> None:
    """The baseline: the log reader alone, one notice per sandbox per batch, as the projector sends."""
    from sandboxctl.bus.tail import Tail

    nc = await nats.connect(url, name="bench-reader")
    tail = Tail(nc.jetstream(), RAW_STREAM, f"{RAW_SUBJECTS}.*")

    async def follow() -> None:
        async for batch in tail.batches():
            latest: dict[str, int] = {}
            for msg in batch:
                latest[subjects.name_of(msg.subject)] = msg.metadata.sequence.stream
            for name, seq in latest.items():
                await nc.publish(f"{RAW_NOTICES}.{name}", encode({"name": name, "seq": seq}))

    task = asyncio.create_task(follow())
    say(ready=True, pid=os.getpid())
    try:
        await until_told_to_stop()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await tail.close()
        await nc.close()


# -- the benchmark ----------------------------------------------------------------------


async def caught_up(db: Path, seq: int, timeout: float) -> None:
    """Wait until the projector has committed up to ``seq``, so that the final check sees all of it."""
    deadline = time.perf_counter() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as check:
            at = check.execute("SELECT seq FROM checkpoint WHERE id = 1").fetchone()[0]
        if at >= seq:
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"projector checkpoint at {at}, expected {seq} within {timeout}s")
        await asyncio.sleep(0.05)


async def run_phase(
    url: str, role: str, child_args: list[str], prefix: str, notices: str, db: Path | None, load: dict[str, Any]
) -> dict[str, Any]:
    names = [f"lag-{i:04d}" for i in range(load["sandboxes"])]
    sampled = set(names[::SAMPLE_EVERY])
    nc = await nats.connect(url, name=f"bench-load-{role}")
    try:
        child, _ = await Child.start("bench.lag", role, "--nats-url", url, *child_args)
        try:
            probe = Probe(nc, names, sampled, db)
            await probe.watch(notices)
            cpu0 = child.cpu_seconds()
            published = await probe.publish(prefix, load["rate"], load["seconds"])
            await probe.drain(30.0)
            cpu = child.cpu_seconds() - cpu0
            if db is not None:
                await caught_up(db, published["events"], 30.0)
        finally:
            await child.stop()
    finally:
        await nc.close()
    result = {
        **published,
        "lag": probe.result(),
        f"{role}_cpu_busy": cpu / published["publish_s"],
        f"{role}_cpu_us_per_event": cpu / published["events"] * 1e6,
    }
    if db is not None:
        if probe.unverified:
            raise RuntimeError(f"rows not in SQLite {READ_PATIENCE:g} s after their notice: {probe.unverified[:5]}")
        result["notices_checked_against_sqlite"] = probe.verified
    return result


async def measure(rate: float, seconds: float, raw_seconds: float, sandboxes: int) -> dict[str, Any]:
    with workdir() as root, nats_server(root) as server:
        nc = await nats.connect(server.url, name="bench-setup")
        try:
            from sandboxctl.bus.streams import ensure_streams

            await ensure_streams(nc.jetstream())
            await nc.jetstream().add_stream(
                StreamConfig(name=RAW_STREAM, subjects=[f"{RAW_SUBJECTS}.*"], storage=StorageType.FILE)
            )
        finally:
            await nc.close()
        raw = await run_phase(
            server.url,
            "reader",
            [],
            RAW_SUBJECTS,
            RAW_NOTICES,
            None,
            {"sandboxes": sandboxes, "rate": rate, "seconds": raw_seconds},
        )
        db = root / "data" / "projection.sqlite3"
        projected = await run_phase(
            server.url,
            "projector",
            ["--db", str(db)],
            subjects.LOG,
            subjects.PROJECTED,
            db,
            {"sandboxes": sandboxes, "rate": rate, "seconds": seconds},
        )
        with contextlib.closing(sqlite3.connect(db)) as check:
            rows, last = check.execute("SELECT count(*), max(last_seq) FROM sandboxes").fetchone()
    if rows != sandboxes or last != projected["events"]:
        expected = f"{sandboxes} up to seq {projected['events']}"
        raise RuntimeError(f"projection holds {rows} rows up to seq {last}; expected {expected}")
    p99 = projected["lag"]["p99_ms"]
    return {
        "rate_target_per_s": rate,
        "seconds": seconds,
        "sandboxes": sandboxes,
        "sampled_sandboxes": len(range(0, sandboxes, SAMPLE_EVERY)),
        "p99_ms": p99,
        "p50_ms": projected["lag"]["p50_ms"],
        "raw_reader_p99_ms": raw["lag"]["p99_ms"],
        "ratio_p99_to_raw": p99 / raw["lag"]["p99_ms"] if raw["lag"]["p99_ms"] > 0 else None,
        "projector": projected,
        "raw_reader": raw,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": p99 <= TARGET_P99_MS,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rate", type=float, default=5000.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--sandboxes", type=int, default=1000)
    p.add_argument("--serve", choices=("projector", "reader"), help=argparse.SUPPRESS)
    p.add_argument("--nats-url", help=argparse.SUPPRESS)
    p.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.serve == "projector":
        asyncio.run(serve_projector(args.nats_url, args.db))
        return
    if args.serve == "reader":
        asyncio.run(serve_reader(args.nats_url))
        return
    if args.quick:
        rate, seconds, raw_seconds, sandboxes = 500.0, 2.0, 1.0, 100
    else:
        rate, seconds, raw_seconds, sandboxes = args.rate, args.seconds, args.seconds / 2, args.sandboxes
    result = asyncio.run(measure(rate, seconds, raw_seconds, sandboxes))
    save(
        "lag",
        {
            "title": "Projection lag",
            "summary": (
                f"Delay from publish-ack to queryable in SQLite, appending a steady {rate:,.0f} events/s for "
                f"{seconds:g} s over {sandboxes:,} sandboxes; against the log reader alone, same load, same run. "
                f"Target: p99 at most {TARGET_P99_MS:g} ms."
            ),
            "notes": (
                "Queryable = the projector's notice for the sandbox arrived with a sequence at or past the "
                "event's (sent while its row commits: a query asking for at least that sequence waits for the "
                f"commit; sampled rows are checked in SQLite {READ_PATIENCE:g} s after their notice). One sandbox in "
                f"{SAMPLE_EVERY} is timed, every event of it. The projector and the reader each run in a process "
                "of their own; the load generator paces on a fixed schedule. A 2-core machine shared with other "
                "work: tail latencies are noisy."
            ),
            **result,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
