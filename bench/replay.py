"""Replay: rebuild the SQLite projection from the log, against reading the log raw.

The log is the source of truth and every projection is disposable, so how fast
a fresh projector catches up on a long log bounds how long a lost or migrated
projection stays stale. The raw baseline is the fastest way we found to read
the same messages out of JetStream with nats-py while doing nothing with them;
the ratio between the two is what sandboxctl's decoding, folding and SQLite
writes cost on top of just reading. Each round also restarts a state machine
on the same log and times it until it takes commands: it folds the whole log
first, so that is how long a restarted service keeps its callers waiting.

The log is filled (untimed) through the same wire contract the state machine
uses: Envelope-encoded lifecycle events, each with the headers
``sandboxctl.bus.eventlog.append`` sends (``Nats-Msg-Id``, ``Nats-Expected-Stream`` and
``Nats-Expected-Last-Subject-Sequence``), so the server itself checks that every
sandbox's history is in order, and readers pay for the headers a real log
carries. Sandboxes advance one step at a time in round-robin (all are created,
then all become Ready, then all are asked to stop, ...), so a batch of
consecutive events touches as many distinct rows as it holds: the projector's
worst case for coalescing upserts, and the shape of a busy log.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats as nats_py
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.common import IMAGE, cpu_seconds, nats, parser, save, workdir
from sandboxctl.bus.streams import ensure_streams
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, encode, new_id
from sandboxctl.events.lifecycle import (
    LifecycleEvent,
    SandboxCreated,
    SandboxReady,
    SandboxStartRequested,
    SandboxStopped,
    SandboxStopRequested,
)
from sandboxctl.services.projector import Projector
from sandboxctl.services.statemachine import StateMachineService

STREAM = subjects.LOG_STREAM
TARGET_RATIO = 0.8
TARGET_RATE = 50_000.0
# (events, sandboxes, timed rounds of raw-then-projector)
SIZES = {False: (1_000_000, 100_000, 5), True: (20_000, 2_000, 1)}
EXPLORE = 200_000  # events each raw reader reads while the fastest is picked
BATCH = 5_000  # raw pull size: larger batches stopped helping well before this
WINDOW = 2  # pull requests kept outstanding by the pipelined raw readers


# --- the log --------------------------------------------------------------------------------


def lifecycle_event(step: int, sandbox_id: str, at: datetime) -> LifecycleEvent:
    """The step-th event of a sandbox that is created, becomes Ready, then cycles stop/start."""
    if step == 0:
        return SandboxCreated(
            sandbox_id=sandbox_id,
            image=IMAGE,
            driver="podman",
            command=["sh", "-c", "sleep infinity"],
            labels={"team": "bench", "purpose": "replay"},
        )
    if step == 1:
        return SandboxReady(incarnation=at.isoformat())
    match (step - 2) % 4:
        case 0:
            return SandboxStopRequested(sandbox_id=sandbox_id, driver="podman", timeout=10.0)
        case 1:
            return SandboxStopped(exit_code=0)
        case 2:
            return SandboxStartRequested(sandbox_id=sandbox_id, driver="podman")
        case _:
            return SandboxReady(incarnation=at.isoformat())


async def fill(nc: NATS, events: int, sandboxes: int) -> dict[str, float]:
    """Append ``events`` events with many publishes in flight; returns the fill's own rate.

    One connection publishes in order, so the server assigns sequence ``i + 1``
    to the i-th publish; that gives each append its expected last subject
    sequence up front, and every ack is checked against it.
    """
    js = nc.jetstream(publish_async_max_pending=4_000)
    await ensure_streams(js)
    names = [f"sbx-{k:06d}" for k in range(sandboxes)]
    ids = [new_id() for _ in range(sandboxes)]
    last = [0] * sandboxes
    base = datetime(2025, 1, 1, tzinfo=UTC)
    start = time.perf_counter()
    pending: list[tuple[int, asyncio.Future[Any]]] = []
    for i in range(events):
        step, k = divmod(i, sandboxes)
        at = base + timedelta(milliseconds=i)
        command_id = new_id()
        envelope = Envelope(
            id=f"{command_id}:0",
            type=type(event := lifecycle_event(step, ids[k], at)).TYPE,
            source="sandboxctl/statemachine",
            subject=names[k],
            time=at,
            data=event,
            actor="bench",
            correlationid=command_id,
            causationid=command_id,
        )
        headers = {"Nats-Msg-Id": envelope.id, "Nats-Expected-Last-Subject-Sequence": str(last[k])}
        future = await js.publish_async(subjects.log(names[k]), encode(envelope), stream=STREAM, headers=headers)
        last[k] = i + 1
        pending.append((i + 1, future))
        if len(pending) >= 20_000 or i == events - 1:
            for seq, ack in zip((s for s, _ in pending), await asyncio.gather(*(f for _, f in pending)), strict=True):
                if ack.seq != seq or ack.duplicate:
                    raise RuntimeError(f"fill out of order: expected seq {seq}, got {ack.seq}")
            pending.clear()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "events_per_s": events / elapsed}


# --- measuring ------------------------------------------------------------------------------


def server_cpu_seconds(pid: int) -> float:
    """nats-server's user+system CPU time, to see which side of the socket is the bottleneck."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    reader: str
    events: int
    bytes: int
    seconds: float
    events_per_s: float
    mb_per_s: float
    client_cpu_s: float  # with the CPU of any process the client started (the catch-up reader)
    server_cpu_s: float
    load1: float  # the machine's 1-minute load average as the run started: other work skews a 2-core box


@dataclass
class Reading:
    """What a reader saw: messages and payload bytes, and when the last one arrived."""

    events: int = 0
    bytes: int = 0
    finished: float = 0.0


def client_cpu_seconds() -> float:
    """This process's CPU and its finished children's: the projector's catch-up reader is one."""
    t = os.times()
    return cpu_seconds() + t.children_user + t.children_system


async def measure(name: str, server_pid: int, read: Callable[[], Awaitable[Reading]]) -> Run:
    load1 = os.getloadavg()[0]
    cpu0, srv0 = client_cpu_seconds(), server_cpu_seconds(server_pid)
    start = time.perf_counter()
    got = await read()
    cpu1, srv1 = client_cpu_seconds(), server_cpu_seconds(server_pid)
    elapsed = got.finished - start
    return Run(
        reader=name,
        events=got.events,
        bytes=got.bytes,
        seconds=elapsed,
        events_per_s=got.events / elapsed,
        mb_per_s=got.bytes / elapsed / 1e6,
        client_cpu_s=cpu1 - cpu0,
        server_cpu_s=srv1 - srv0,
        load1=load1,
    )


def deadline(events: int) -> float:
    """A generous limit so a stuck reader fails the run instead of hanging it."""
    return 60.0 + events / 2_000


# --- raw readers: nats-py doing nothing but reading -------------------------------------------


def _ephemeral() -> ConsumerConfig:
    """The consumer the projector's Tail creates: ephemeral, no acks, from the start, in memory."""
    return ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=subjects.LOG_ALL,
        inactive_threshold=300.0,
        mem_storage=True,
        num_replicas=1,
    )


async def read_fetch(nc: NATS, events: int, batch: int) -> Reading:
    """``PullSubscription.fetch`` in a loop: the documented nats-py way, and what Tail does."""
    js = nc.jetstream()
    info = await js.add_consumer(STREAM, config=_ephemeral())
    sub = await js.pull_subscribe_bind(consumer=info.name, stream=STREAM)
    got = Reading()
    limit = time.perf_counter() + deadline(events)
    try:
        while got.events < events and time.perf_counter() < limit:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            got.events += len(msgs)
            got.bytes += sum(len(m.data) for m in msgs)
        got.finished = time.perf_counter()
    finally:
        await sub.unsubscribe()
        await js.delete_consumer(STREAM, info.name)
    return got


async def _counting(
    nc: NATS, events: int, start: Callable[[Callable[[Msg], Awaitable[None]]], Awaitable[Any]]
) -> Reading:
    """Count messages in a subscription callback until ``events`` have arrived.

    A callback is nats-py's cheapest delivery path: ``next_msg`` (which
    ``fetch`` uses) wraps every single message in ``asyncio.wait_for``. Status
    messages (heartbeats, end of batch, expired pulls) carry no payload and are
    not counted; ``on_status`` lets a reader react to them.
    """
    got = Reading()
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if not msg.data:
            return
        got.events += 1
        got.bytes += len(msg.data)
        if got.events >= events and not done.is_set():
            got.finished = time.perf_counter()
            done.set()

    await start(on_msg)
    await asyncio.wait_for(done.wait(), deadline(events))
    return got


async def read_ordered_push(nc: NATS, events: int) -> Reading:
    """nats-py's ordered push consumer (flow control, heartbeats, a callback per message)."""
    js = nc.jetstream()
    subs: list[Any] = []

    async def start(cb: Callable[[Msg], Awaitable[None]]) -> None:
        subs.append(
            await js.subscribe(
                subjects.LOG_ALL, stream=STREAM, cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
        )

    try:
        return await _counting(nc, events, start)
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def read_push_flow_control(nc: NATS, events: int) -> Reading:
    """A plain push consumer with flow control, counted in a callback: nats-py's ordered
    consumer without its per-message sequence checks (the catch-up reader's way)."""
    js = nc.jetstream()
    inbox = nc.new_inbox()
    subs: list[Any] = []
    consumers: list[str] = []

    async def start(count: Callable[[Msg], Awaitable[None]]) -> None:
        async def cb(msg: Msg) -> None:
            if msg.data:
                await count(msg)
            elif msg.reply:  # flow control
                await nc.publish(msg.reply, b"")

        subs.append(await nc.subscribe(inbox, cb=cb, pending_msgs_limit=-1, pending_bytes_limit=-1))
        config = _ephemeral()
        config.deliver_subject = inbox
        config.flow_control = True
        config.idle_heartbeat = 1.0
        consumers.append((await js.add_consumer(STREAM, config=config)).name)

    try:
        return await _counting(nc, events, start)
    finally:
        for sub in subs:
            await sub.unsubscribe()
        for name in consumers:
            await js.delete_consumer(STREAM, name)


async def read_pipelined_pull(nc: NATS, events: int, batch: int = BATCH, window: int = WINDOW) -> Reading:
    """A pull consumer driven by hand: ``WINDOW`` pull requests of ``BATCH`` kept in
    flight on a plain subscription with a callback, so the server never waits
    for the client to ask again and no message goes through ``next_msg``."""
    js = nc.jetstream()
    info = await js.add_consumer(STREAM, config=_ephemeral())
    pull = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{info.name}"
    inbox = nc.new_inbox()
    request = json.dumps({"batch": batch, "expires": 60_000_000_000}).encode()
    state = {"seen": 0, "asked": 0}
    subs: list[Any] = []

    async def ask() -> None:
        state["asked"] += batch
        await nc.publish(pull, request, reply=inbox)

    async def start(count: Callable[[Msg], Awaitable[None]]) -> None:
        async def cb(msg: Msg) -> None:
            await count(msg)
            if msg.data:
                state["seen"] += 1
                if state["seen"] % batch == 0 and state["asked"] < events:
                    await ask()

        subs.append(await nc.subscribe(inbox, cb=cb))
        for _ in range(window):
            await ask()

    try:
        return await _counting(nc, events, start)
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await js.delete_consumer(STREAM, info.name)


async def read_direct_batch(nc: NATS, events: int, batch: int = 1_000, window: int = WINDOW) -> Reading:
    """Batched direct get (nats-server 2.11+, ADR-31; nats-py 2.16 has no helper for it):
    ``{"seq": s, "batch": n}`` to ``$JS.API.DIRECT.GET.<stream>``, answered by up
    to n messages and an end-of-batch status; no consumer at all."""
    subject = f"$JS.API.DIRECT.GET.{STREAM}"
    inbox = nc.new_inbox()
    state = {"next": 1}
    subs: list[Any] = []

    async def ask() -> None:
        if state["next"] <= events:
            await nc.publish(subject, json.dumps({"seq": state["next"], "batch": batch}).encode(), reply=inbox)
            state["next"] += batch

    async def start(count: Callable[[Msg], Awaitable[None]]) -> None:
        async def cb(msg: Msg) -> None:
            if msg.data:
                await count(msg)
            elif msg.headers and msg.headers.get("Status") == "204":  # end of one batch
                await ask()

        subs.append(await nc.subscribe(inbox, cb=cb))
        for _ in range(window):
            await ask()

    try:
        return await _counting(nc, events, start)
    finally:
        for sub in subs:
            await sub.unsubscribe()


RAW_READERS: dict[str, Callable[[NATS, int], Awaitable[Reading]]] = {
    "fetch_1000": lambda nc, n: read_fetch(nc, n, 1_000),
    f"fetch_{BATCH}": lambda nc, n: read_fetch(nc, n, BATCH),
    "ordered_push": read_ordered_push,
    "push_flow_control": read_push_flow_control,
    f"pipelined_pull_{BATCH}x{WINDOW}": read_pipelined_pull,
    f"direct_get_batch_1000x{WINDOW}": read_direct_batch,
}


async def raw(url: str, server_pid: int, name: str, events: int) -> Run:
    nc = await nats_py.connect(url)
    try:
        return await measure(name, server_pid, lambda: RAW_READERS[name](nc, events))
    finally:
        await nc.close()


# --- sandboxctl: a fresh projector on a fresh SQLite file -------------------------------------


async def project(url: str, server_pid: int, db_path: Path, events: int, sandboxes: int) -> Run:
    """From ``Projector.start`` to its position reaching the log's last sequence.

    Counts everything a rebuild does: opening SQLite and its schema, creating
    the consumer, reading, decoding, folding and committing every batch.
    """
    nc = await nats_py.connect(url)
    projector = Projector(nc, db_path, notify=False)

    async def rebuild() -> Reading:
        await projector.start()
        await asyncio.wait_for(projector.caught_up.wait(), deadline(events))
        finished = time.perf_counter()
        if projector.position != events:
            raise RuntimeError(f"projector caught up at {projector.position}, expected {events}")
        return Reading(events=events, bytes=0, finished=finished)

    try:
        run = await measure("projector", server_pid, rebuild)
    finally:
        await projector.stop()
        await nc.close()
    check_projection(db_path, events, sandboxes)
    return run


async def recover(url: str, server_pid: int, events: int, sandboxes: int) -> Run:
    """From ``StateMachineService.start`` to its answering commands: a restarted state
    machine folds the whole log before it takes its first command."""
    nc = await nats_py.connect(url)
    service = StateMachineService(nc, drivers=("podman",))

    async def fold() -> Reading:
        await asyncio.wait_for(service.start(), deadline(events))
        finished = time.perf_counter()
        phases = {state.phase.value for state in service.states.values()}
        if service.position != events or len(service.states) != sandboxes or phases != {"Ready"}:
            raise RuntimeError(f"state machine recovered wrong: position={service.position} phases={phases}")
        return Reading(events=events, bytes=0, finished=finished)

    try:
        return await measure("statemachine", server_pid, fold)
    finally:
        await service.stop()
        await nc.close()


def check_projection(db_path: Path, events: int, sandboxes: int) -> None:
    """The rebuilt projection is the log's: at its last event, every sandbox Ready."""
    with sqlite3.connect(db_path) as db:
        phases = dict(db.execute("SELECT phase, count(*) FROM sandboxes GROUP BY phase").fetchall())
        (position,) = db.execute("SELECT seq FROM checkpoint WHERE id = 1").fetchone()
    if position != events or phases != {"Ready": sandboxes}:
        raise RuntimeError(f"projection wrong: position={position} phases={phases}")


# --- the run ----------------------------------------------------------------------------------


def summary(runs: list[Run]) -> dict[str, Any]:
    """Best and median of a side's runs, in events/s and in client CPU per event.

    Other work on the machine can only slow a run down, so the best run is the
    closest to what the code can do here; CPU per event moves much less with
    load than wall time does, so it is reported as a cross-check.
    """
    rates = [r.events_per_s for r in runs]
    cpu = [r.client_cpu_s / r.events * 1e6 for r in runs]
    return {
        "events_per_s": max(rates),
        "median_events_per_s": statistics.median(rates),
        "client_cpu_us_per_event": min(cpu),
        "median_client_cpu_us_per_event": statistics.median(cpu),
        "runs": [asdict(r) for r in runs],
    }


async def explore(url: str, pid: int, events: int) -> tuple[str, dict[str, Any]]:
    """Try every raw reader (twice, on up to EXPLORE events: their rates do not
    depend on the log's length) and name the fastest."""
    count = min(events, EXPLORE)
    tried: dict[str, list[Run]] = {name: [] for name in RAW_READERS}
    for _ in range(2):
        for name in RAW_READERS:
            tried[name].append(await raw(url, pid, name, count))
    best = {name: max(runs, key=lambda r: r.events_per_s) for name, runs in tried.items()}
    fastest = max(best.values(), key=lambda r: r.events_per_s).reader
    table = {
        name: {"events": count, "events_per_s": r.events_per_s, "mb_per_s": r.mb_per_s, "load1": r.load1}
        for name, r in best.items()
    }
    return fastest, table


async def run(quick: bool) -> dict[str, Any]:
    events, sandboxes, rounds = SIZES[quick]
    with workdir() as root, nats(root) as server:
        assert server.proc is not None
        pid = server.proc.pid
        nc = await nats_py.connect(server.url)
        try:
            filled = await fill(nc, events, sandboxes)
            state = (await nc.jetstream().stream_info(STREAM)).state
        finally:
            await nc.close()
        if state.messages != events:
            raise RuntimeError(f"stream holds {state.messages} messages, expected {events}")

        best, readers = await explore(server.url, pid, events)
        # Rounds of raw-then-projector over the whole log, alternated so that
        # whatever else loads the machine weighs on both sides alike.
        raw_runs: list[Run] = []
        projector_runs: list[Run] = []
        recoveries: list[Run] = []
        for i in range(rounds):
            raw_runs.append(await raw(server.url, pid, best, events))
            projector_runs.append(await project(server.url, pid, root / f"projection-{i}.db", events, sandboxes))
            recoveries.append(await recover(server.url, pid, events, sandboxes))

    raw_side, ours, recovery = summary(raw_runs), summary(projector_runs), summary(recoveries)
    ratio = ours["events_per_s"] / raw_side["events_per_s"]
    rate = ours["events_per_s"]
    return {
        "title": "Replay: rebuilding the projection from the log",
        "summary": (
            f"A fresh projector folds {events:,} events over {sandboxes:,} sandboxes into a new SQLite file, "
            f"against the fastest raw nats-py read of the same messages ({best}). "
            f"Target: at least {TARGET_RATIO}x the raw rate and {TARGET_RATE:,.0f} events/s."
        ),
        "notes": (
            f"Best of {rounds} alternated rounds per side (medians alongside); each run records the 1-minute "
            "load average it started under. The machine has 2 cores shared by nats-server, the reader and "
            "SQLite's thread, and other work (test suites, other benchmarks) may run at the same time, so a "
            "single run can be off by a factor of two or more; client CPU per event is the steadier figure."
        ),
        "events": events,
        "sandboxes": sandboxes,
        "stream_bytes": state.bytes,
        "fill": filled,
        "raw_readers": readers,
        "raw": {"reader": best, "bytes": raw_runs[0].bytes, **raw_side},
        "sandboxctl": ours,
        "ratio": ratio,
        "median_ratio": ours["median_events_per_s"] / raw_side["median_events_per_s"],
        "cpu_ratio": raw_side["client_cpu_us_per_event"] / ours["client_cpu_us_per_event"],
        # Not a target of its own: how long a restarted state machine folds this log before its first command.
        "statemachine_recovery": {
            **recovery,
            "seconds": min(r.seconds for r in recoveries),
            "ratio": recovery["events_per_s"] / raw_side["events_per_s"],
        },
        "target": {"ratio": TARGET_RATIO, "events_per_s": TARGET_RATE},
        "target_met": {
            "ratio": ratio >= TARGET_RATIO,
            "events_per_s": rate >= TARGET_RATE,
            "both": ratio >= TARGET_RATIO and rate >= TARGET_RATE,
        },
    }


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    save("replay", asyncio.run(run(args.quick)), args.quick)


if __name__ == "__main__":
    main()
