"""Replicas: what a three-node cluster and a second state machine cost, and how fast one takes over.

Commands. Each case runs its own nats-server (one node, R1) or three nodes routed into one
JetStream cluster on this host (R3, the log on all three), and one or two state machines,
each ``sandboxctl serve --only statemachine`` in a process of its own, as deployed. The load
generator (this process) first creates SANDBOXES sandboxes, then keeps IN_FLIGHT label updates
in flight for DURATION seconds, each to a sandbox drawn at random, as plain NATS requests: every
update decides against the sandbox's state and appends one event with the sequence guard, so
two state machines race on the same sandboxes and the guard refuses the loser, which decides
again (``conflicts``, read from the state machines' health reports). Measured per case: accepted
updates per second, and each update's time from request to reply (p50, p99). No engine is
involved: these are the control plane's figures.

Take-over. On three nodes and two state machines, the one that applies the facts is killed
with SIGKILL, and at once a driver's fact is published for a sandbox still Provisioning: the
time until its event is in the log is how long facts wait for the other to take over. Then a
log of LOG_EVENTS events: a state machine that starts on it with the snapshot another wrote,
against one that starts with no snapshot (it folds the whole log), each timed from its
process's start to its first answered command.

Baselines, in the same run: R1 with one state machine for the costs; the start without a
snapshot for the start.

Usage: ``python -m bench.cluster [--quick]``.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.js.object_store import ObjectStore

from bench.common import parser, percentiles, save, workdir
from bench.replay import fill
from sandboxctl.bus import snapshots
from sandboxctl.bus.eventlog import last_subject_seq, publish_fact
from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.events.commands import CreateSandbox, UpdateSandbox
from sandboxctl.events.envelope import Envelope, encode, new_id, now, type_name
from sandboxctl.events.facts import ContainerStarted
from sandboxctl.events.health import ServiceHealth
from sandboxctl.events.limits import SNAPSHOT_EVERY
from sandboxctl.events.replies import reply_decoder
from sandboxctl.runtime import health
from sandboxctl.runtime.embedded import ClusterNode, NatsServer, free_port
from testing.hosts import announce_host
from testing.serve import Service

CASES = (("R1", 1, 1), ("R1", 1, 2), ("R3", 3, 1), ("R3", 3, 2))  # (replicas, nodes, state machines)
SANDBOXES = 200
IN_FLIGHT = 64
TAKEOVER_TARGET_S = 2.0


HOST = "bench-host"  # the simulated host every sandbox is placed on


def state_machine(urls: str, root: Path, name: str, **settings: str) -> Service:
    """``sandboxctl serve --only statemachine`` in a process of its own, not started yet."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOXCTL_")},
        **settings,
        "SANDBOXCTL_NATS_URL": urls,
        "SANDBOXCTL_DATA_DIR": str(root / name),
        "SANDBOXCTL_RUN_DIR": str(root / f"{name}-run"),
        "SANDBOXCTL_DRIVERS": "podman",
        "SANDBOXCTL_DEFAULT_DRIVER": "podman",
    }
    return Service("statemachine", env, root, name)


@contextmanager
def servers(root: Path, nodes: int) -> Iterator[list[NatsServer]]:
    if nodes == 1:
        started = [NatsServer(root / "nats").start()]
    else:
        routes = [free_port() for _ in range(nodes)]
        secret = secrets.token_urlsafe(12)
        started = []
        for i in range(1, nodes + 1):
            peers = tuple(p for j, p in enumerate(routes, 1) if j != i)
            node = ClusterNode(index=i, name="bench", tag="b", port=routes[i - 1], peers=peers, secret=secret)
            started.append(NatsServer(root / f"n{i}", cluster=node))
        for server in started:
            server.start()
    try:
        yield started
    finally:
        for server in started:
            server.stop()


async def jetstream_ready(nc: NATS) -> None:
    while True:
        try:
            await nc.jetstream(timeout=2).account_info()
            return
        except Exception:
            await asyncio.sleep(0.25)


async def counters(nc: NATS) -> list[dict[str, int]]:
    """Every state machine's counters, from the health answers."""
    reports: list[ServiceHealth] = await health.gather(nc)
    return [r.counters for r in reports if r.component == "statemachine"]


async def drive(nc: NATS, names: list[str], duration: float) -> dict[str, Any]:
    """Label updates, IN_FLIGHT at a time, for ``duration`` seconds."""
    rng = random.Random(20261201)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + duration
    counter = 0

    async def lane() -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            counter += 1
            name = rng.choice(names)
            payload = encode(
                UpdateSandbox(name=name, labels={"n": str(counter)}, command_id=f"u-{counter}", actor="bench")
            )
            began = time.monotonic()
            reply = reply_decoder.decode((await nc.request(subjects.command("update"), payload, timeout=30)).data)
            latencies.append(time.monotonic() - began)
            if reply.error is not None:
                errors[reply.error.code] = errors.get(reply.error.code, 0) + 1

    began = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
    elapsed = time.monotonic() - began
    accepted = len(latencies) - sum(errors.values())
    return {
        "accepted": accepted,
        "errors": errors,
        "per_s": accepted / elapsed,
        "latency": percentiles(latencies),
    }


async def create(nc: NATS, names: list[str]) -> None:
    async def one(name: str) -> None:
        payload = encode(CreateSandbox(name=name, image="bench", driver="podman", command_id=f"c-{name}", actor="b"))
        reply = reply_decoder.decode((await nc.request(subjects.command("create"), payload, timeout=30)).data)
        assert reply.accepted, reply

    for start in range(0, len(names), IN_FLIGHT):
        await asyncio.gather(*(one(n) for n in names[start : start + IN_FLIGHT]))


async def facts_takeover(nc: NATS, machines: list[Service], names: list[str]) -> float:
    """Kill the state machine that applies the facts; how long until a fact is applied again."""
    js = nc.jetstream()
    for name in names[:5]:  # facts, until one instance holds the pin
        await report_started(nc, name)
    holder_pid = 0
    for _ in range(400):
        reports = [r for r in await health.gather(nc) if r.component == "statemachine"]
        holder_pid = next((r.pid for r in reports if r.counters.get("applies_facts")), 0)
        if holder_pid:
            break
        await asyncio.sleep(0.05)
    holder = next(m for m in machines if m.proc is not None and m.proc.pid == holder_pid)
    target = names[-1]
    before = await last_subject_seq(js, target)
    holder.kill()
    killed = time.monotonic()
    await report_started(nc, target)
    for _ in range(100_000):
        if await last_subject_seq(js, target) != before:
            break
        await asyncio.sleep(0.01)
    return time.monotonic() - killed


async def report_started(nc: NATS, name: str) -> None:
    """A driver's fact that the sandbox's container started (no engine: the benchmark says it)."""
    raw = await nc.jetstream().get_last_msg(subjects.LOG_STREAM, subjects.log(name))
    created = msgspec.json.decode(raw.data or b"{}")
    fact = ContainerStarted(sandbox_id=created["data"].get("sandbox_id", ""), incarnation="2026-12-01T00:00:01Z")
    envelope = Envelope(
        id=new_id(), type=type_name(ContainerStarted), source="bench", subject=name, time=now(), data=fact
    )
    await publish_fact(nc.jetstream(), envelope, HOST)  # as the worker of the host it is placed on


async def command_answered(nc: NATS, name: str) -> None:
    payload = encode(UpdateSandbox(name=name, labels={"probe": new_id()[:8]}, command_id=new_id(), actor="bench"))
    while True:
        try:
            reply = reply_decoder.decode((await nc.request(subjects.command("update"), payload, timeout=1)).data)
            if reply.accepted:
                return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            pass
        await asyncio.sleep(0.01)


async def starts(root: Path, events: int) -> dict[str, Any]:
    """A state machine's start on a log of ``events`` events, and a new reader replica's (an empty
    database), each with its snapshot and without."""
    with servers(root, 1) as (server,):
        nc = await nats.connect(server.url)
        try:
            await fill(nc, events, 1000)
            js = nc.jetstream()
            machine = await with_and_without(
                nc,
                events,
                await snapshots.snapshot_store(js),
                snapshots.OBJECT,
                lambda data: snapshots.decode_snapshot(data).position,
                lambda name, **settings: state_machine(server.url, root, name, **settings),
                lambda head: command_answered(nc, "sbx-000001"),
            )
            machine["reader"] = await with_and_without(
                nc,
                events,
                await snapshots.projection_store(js),
                snapshots.PROJECTION,
                lambda data: msgspec.msgpack.decode(data, type=snapshots.ProjectionSnapshot).position,
                lambda name, **settings: reader(server.url, root, "reader-" + name, **settings),
                lambda head: read_at(nc, "sbx-000001", head),
            )
            return machine
        finally:
            await nc.close()


async def with_and_without(
    nc: NATS,
    events: int,
    store: ObjectStore,
    obj: str,
    position_of: Callable[[bytes], int],
    service: Callable[..., Service],
    answered: Callable[[int], Awaitable[None]],
) -> dict[str, Any]:
    """A first ``service`` folds the whole log and writes its snapshot ``obj``; then a new one is
    timed from its start to its first answer at the log's head (``answered``), with the snapshot
    and again without it."""
    head = (await nc.jetstream().stream_info(subjects.LOG_STREAM)).state.last_seq
    first = service("writer", SANDBOXCTL_SNAPSHOT_EVERY=str(min(SNAPSHOT_EVERY, events // 2)))
    await asyncio.to_thread(first.start)
    while True:  # the first writes a snapshot of the whole log, in the background
        try:
            if position_of((await store.get(obj)).data or b"") >= head:
                break
        except Exception:
            pass
        await asyncio.sleep(0.2)
    first.stop()
    timed: dict[str, float] = {}
    for case in ("with the snapshot", "without a snapshot"):
        if case == "without a snapshot":
            await store.delete(obj)
        started = service(case.replace(" ", "-"))
        began = time.monotonic()
        starting = asyncio.create_task(asyncio.to_thread(started.start))
        await answered(head)
        timed[case] = time.monotonic() - began
        await starting
        started.stop()
    return {
        "log_events": head,
        "with_snapshot_s": timed["with the snapshot"],
        "without_snapshot_s": timed["without a snapshot"],
        "ratio_with_to_without": timed["with the snapshot"] / timed["without a snapshot"],
        "target_s": TAKEOVER_TARGET_S,
        "target_met": timed["with the snapshot"] <= TAKEOVER_TARGET_S,
    }


def reader(urls: str, root: Path, name: str, **settings: str) -> Service:
    """``sandboxctl serve --only projector,query`` (a reader replica, on a SQLite of its own) in a
    process of its own, not started yet."""
    service = state_machine(urls, root, name, **settings)
    service.component = "projector,query"
    return service


async def read_at(nc: NATS, name: str, position: int) -> None:
    """Return once a query replica answers a get of ``name`` reflecting at least ``position``."""
    client = SandboxClient(nc, actor="bench", request_timeout=2.0, retries=0)
    client.seen = position
    while True:
        try:
            await client.get(name)
            return
        except SandboxError:
            await asyncio.sleep(0.01)


async def case(root: Path, replicas: str, nodes: int, machines: int, duration: float) -> dict[str, Any]:
    with servers(root, nodes) as started:
        urls = ",".join(s.url for s in started)
        nc = await nats.connect(urls.split(","), max_reconnect_attempts=-1)
        running: list[Service] = []
        try:
            await jetstream_ready(nc)
            running = [state_machine(urls, root, f"sm{i}") for i in range(machines)]
            for machine in running:
                await asyncio.to_thread(machine.start)
            # A simulated host (no worker runs: these are the control plane's figures) to place on.
            await announce_host(urls.split(",")[0], HOST, engines=("podman",))
            names = [f"b-{i:04d}" for i in range(SANDBOXES)]
            await create(nc, names)
            result = await drive(nc, names, duration)
            result["conflicts"] = sum(c.get("conflicts", 0) for c in await counters(nc))
            result["conflicts_per_1000_accepted"] = 1000 * result["conflicts"] / max(1, result["accepted"])
            if nodes == 3 and machines == 2:
                result["facts_takeover_s"] = await facts_takeover(nc, running, names)
            print(f"{replicas} x{machines}: {result}", file=sys.stderr, flush=True)
            return result
        finally:
            await nc.close()
            for machine in running:
                machine.stop()


async def run(quick: bool) -> dict[str, Any]:
    duration = 1.5 if quick else 20.0
    events = 5_000 if quick else 1_000_000
    out: dict[str, Any] = {"sandboxes": SANDBOXES, "in_flight": IN_FLIGHT, "duration_s": duration, "cases": {}}
    for replicas, nodes, machines in CASES:
        with workdir() as root:
            out["cases"][f"{replicas}, {machines} state machine{'s' if machines > 1 else ''}"] = await case(
                root, replicas, nodes, machines, duration
            )
    cases = out["cases"]
    base = cases["R1, 1 state machine"]
    out["ratios"] = {
        name: {
            "per_s": c["per_s"] / base["per_s"],
            "p50": c["latency"]["p50_ms"] / base["latency"]["p50_ms"],
            "p99": c["latency"]["p99_ms"] / base["latency"]["p99_ms"],
        }
        for name, c in cases.items()
    }
    with workdir() as root:
        out["start"] = await starts(root, events)
    takeover = cases["R3, 2 state machines"]["facts_takeover_s"]
    out["facts_takeover_s"] = takeover
    out["target_met"] = (
        takeover <= TAKEOVER_TARGET_S and out["start"]["target_met"] and out["start"]["reader"]["target_met"]
    )
    return out


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    save("cluster", asyncio.run(run(args.quick)), args.quick)


if __name__ == "__main__":
    main()
