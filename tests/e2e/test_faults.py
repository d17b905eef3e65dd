"""Fault injection: a mixed workload while services are killed, NATS restarts and the engine goes away.

Every service runs in a process of its own (``sandboxctl serve --only ...``),
against a nats-server and a ``podman system service`` of this test's own, as
they would be deployed. While LANES lanes drive at least MIN_COMMANDS commands
(create, stop, start, delete, and a create again of a deleted name), faults
come one after another at random moments, in rounds, each kind once a round:

- ``kill -9`` of the state machine, the driver worker, the projector and the
  query service, each restarted after a random pause;
- ``kill -9`` of the nats-server, restarted on the same port and data;
- the engine's service stopped, and brought back after a pause.

A lane reads each sandbox's phase from the log itself (not from the query
service, which is one of the victims) and sends its next command once the
sandbox has settled. Once the workload is over and everything is back:

- every command's events are in the log exactly once: no reply claims an
  append the log lacks (lost), and no command caused two events (duplicated);
- every sandbox is settled (Ready, Stopped, Error or Deleted) within
  SETTLE_BOUND seconds, and the engine agrees with the phase;
- ``sandboxctl.audit.verify`` finds no violation of the log's invariants;
- the projection, once caught up, equals a fresh replay of the log, and the
  query service serves it.

The figures are printed at the end (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest

from sandboxctl import audit
from sandboxctl.bus import reading
from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.runtime.embedded import NatsServer, PodmanService
from sandboxctl.services.projection import checkpoint, connect
from testing.serve import Service
from tests.conftest import Engine
from tests.logview import LogFollower

LANES = 32
MIN_COMMANDS = 320  # at least 10 per lane
MIN_FAULT_ROUNDS = 2
SETTLE_BOUND = 120.0  # seconds for every sandbox to settle once the faults are over
LANE_WAIT = 150.0  # a lane gives up waiting for one sandbox to settle after this long
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]
SERVICES = ("statemachine", "worker", "projector", "query")
FAULTS = (*(f"kill -9 {s}" for s in SERVICES), "kill -9 nats-server", "stop the engine")
SETTLED = frozenset({"Ready", "Stopped", "Error", "Deleted"})


@dataclass
class Sent:
    name: str
    verb: str
    command_id: str
    reply: Any = None
    error: str = ""
    at: float = 0.0  # when it was sent (monotonic)
    waited: float = 0.0  # how long it waited for its answer, retries included


@dataclass
class Figures:
    sent: list[Sent] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    fault_rounds: int = 0
    stuck: dict[str, str] = field(default_factory=dict)


class Workload:
    def __init__(self, client: SandboxClient, follower: LogFollower, image: str, figures: Figures) -> None:
        self.client = client
        self.follower = follower
        self.image = image
        self.figures = figures
        self.random = random.Random(20261129)
        self.faults_done = asyncio.Event()

    async def phase(self, name: str) -> tuple[int, str | None]:
        """The sandbox's phase folded from the log itself (the query service is one of the victims)."""
        return self.follower.phase(name)

    async def settled(self, name: str) -> str | None:
        deadline = time.monotonic() + LANE_WAIT
        while True:
            _, phase = await self.phase(name)
            if phase is None or phase in SETTLED:
                return phase
            if time.monotonic() > deadline:
                self.figures.stuck[name] = f"{phase} for {LANE_WAIT:g}s while the faults went on"
                return phase
            await asyncio.sleep(0.1)

    def next_verb(self, phase: str | None) -> str:
        roll = self.random.random()
        if phase in (None, "Deleted"):
            return "create"
        if phase == "Ready":
            return "stop" if roll < 0.7 else "delete" if roll < 0.85 else "start"
        if phase == "Stopped":
            return "start" if roll < 0.7 else "delete" if roll < 0.9 else "stop"
        return "start" if roll < 0.6 else "delete"  # Error

    async def send(self, name: str, verb: str) -> None:
        sent = Sent(name, verb, f"fault:{name}:{len(self.figures.sent)}", at=time.monotonic())
        self.figures.sent.append(sent)
        try:
            if verb == "create":
                sent.reply = await self.client.create(
                    name, self.image, command=SLEEPER, driver="podman", command_id=sent.command_id
                )
            elif verb == "stop":
                sent.reply = await self.client.stop(name, timeout=5, command_id=sent.command_id)
            else:
                sent.reply = await getattr(self.client, verb)(name, command_id=sent.command_id)
        except SandboxError as exc:
            sent.error = f"{exc.code}: {exc}"
        sent.waited = time.monotonic() - sent.at

    async def lane(self, name: str, quota: int) -> None:
        done = 0
        while done < quota or not self.faults_done.is_set():
            phase = await self.settled(name)
            if name in self.figures.stuck:
                return
            await self.send(name, self.next_verb(phase))
            done += 1
            # A user whose sandbox failed (the engine is away) looks before trying again.
            await asyncio.sleep(self.random.uniform(0.5, 1.5) if phase == "Error" else self.random.uniform(0, 0.3))


async def inject_faults(
    services: dict[str, Service], server: NatsServer, engine: PodmanService, figures: Figures, rng: random.Random
) -> None:
    for round_ in range(MIN_FAULT_ROUNDS):
        order = list(FAULTS)
        rng.shuffle(order)
        for fault in order:
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            if fault == "kill -9 nats-server":
                assert server.proc is not None
                server.proc.kill()
                server.proc.wait()
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                await asyncio.to_thread(server.start)
            elif fault == "stop the engine":
                await asyncio.to_thread(engine.stop)
                await asyncio.sleep(rng.uniform(2.0, 5.0))
                await asyncio.to_thread(engine.start)
            else:
                service = services[fault.removeprefix("kill -9 ")]
                await asyncio.to_thread(service.kill)
                await asyncio.sleep(rng.uniform(0.2, 2.0))
                await asyncio.to_thread(service.start)
            figures.faults[fault] += 1
        figures.fault_rounds = round_ + 1


async def assert_exactly_once(js: Any, sent: list[Sent]) -> int:
    """Every command's events are in the log once: no reply claims an append the log lacks (lost),
    no command caused two events (duplicated); and the log keeps its invariants. Its length."""
    count, violations = await audit.verify(js)
    assert violations == [], violations[:10]
    caused: dict[str, list[int]] = {}
    async for seq, envelope, _ in reading.read_events(js):
        assert not isinstance(envelope, Exception), f"unreadable log entry {seq}: {envelope}"
        if envelope.causationid.startswith("fault:"):
            caused.setdefault(envelope.causationid, []).append(seq)
    duplicated = {cid: seqs for cid, seqs in caused.items() if len(seqs) > 1}
    lost = [s for s in sent if s.reply is not None and s.reply.appended and caused.get(s.command_id) != [s.reply.seq]]
    assert not duplicated, duplicated
    assert not lost, lost[:10]
    return count


def assert_engine_agrees(engine: Engine, final: dict[str, str | None]) -> None:
    """The engine holds what each settled phase says: a running container for Ready, a stopped one
    for Stopped, neither container nor workspace for Deleted."""
    for name, phase in final.items():
        if phase == "Ready":
            assert engine.state(name)["Running"], f"{name} is Ready but its container is not running"
        elif phase == "Stopped":
            assert not engine.state(name)["Running"], f"{name} is Stopped but its container runs"
        elif phase == "Deleted":
            assert not engine.container_exists(name), f"{name} is Deleted but its container is there"
            assert not engine.volume_exists(name), f"{name} is Deleted but its workspace is there"


@pytest.mark.timeout(900)
async def test_no_event_lost_and_no_sandbox_stuck_through_kills_restarts_and_engine_outages(
    tmp_path: Path, image: str, names, engines: dict[str, Engine], podman_service: PodmanService
) -> None:
    started = time.monotonic()
    server = NatsServer(tmp_path / "nats").start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOXCTL_")},
        "SANDBOXCTL_NATS_URL": server.url,
        "SANDBOXCTL_DATA_DIR": str(tmp_path / "data"),
        "SANDBOXCTL_RUN_DIR": str(tmp_path / "run"),
        "SANDBOXCTL_PODMAN_URL": podman_service.url,
        "SANDBOXCTL_DRIVERS": "podman",
        "SANDBOXCTL_DEFAULT_DRIVER": "podman",
    }
    services = {c: Service(c, env, tmp_path) for c in SERVICES}
    figures = Figures()
    nc = client = follower = None
    try:
        for service in services.values():
            await asyncio.to_thread(service.start)
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream()
        client = await SandboxClient.connect(
            server.url, actor="fault-suite", max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        client.retries, client.request_timeout = 10, 5.0
        follower = LogFollower(js).start()
        workload = Workload(client, follower, image, figures)
        lanes = [names.new("fault") for _ in range(LANES)]
        quota = -(-MIN_COMMANDS // LANES)

        async def faults() -> None:
            try:
                await inject_faults(services, server, podman_service, figures, random.Random(1129))
            finally:
                workload.faults_done.set()

        async def progress() -> None:
            while True:
                await asyncio.sleep(10)
                print(
                    f"faults (progress) {time.monotonic() - started:.0f}s: {len(figures.sent)} commands, "
                    f"faults {dict(figures.faults)}, stuck {figures.stuck}",
                    file=sys.stderr,
                    flush=True,
                )

        reporter = asyncio.create_task(progress())
        try:
            await asyncio.gather(faults(), *(workload.lane(name, quota) for name in lanes))
        finally:
            reporter.cancel()
        workload_done = time.monotonic()

        # Everything is back: every sandbox settles within the bound.
        settle_deadline = time.monotonic() + SETTLE_BOUND
        head = (await js.stream_info(subjects.LOG_STREAM)).state.last_seq
        for _ in range(int(SETTLE_BOUND / 0.05)):
            if follower.position >= head:
                break
            await asyncio.sleep(0.05)
        final: dict[str, str | None] = {}
        for name in lanes:
            while True:
                _, phase = await workload.phase(name)
                if phase is None or phase in SETTLED or time.monotonic() > settle_deadline:
                    final[name] = phase
                    break
                await asyncio.sleep(0.1)
        settle_time = time.monotonic() - workload_done
        unsettled = {n: p for n, p in final.items() if p is not None and p not in SETTLED}
        figures.stuck.update({n: f"{p} after {SETTLE_BOUND:g}s" for n, p in unsettled.items()})
        assert not figures.stuck, f"stuck: {figures.stuck}\n" + "\n\n".join(
            f"--- {s.component}\n{s.tail()}" for s in services.values()
        )

        # Exactly once: each command caused at most one event; no reply claims an append the log lacks.
        count = await assert_exactly_once(js, figures.sent)
        accepted = [s for s in figures.sent if s.reply is not None]
        unanswered = [s for s in figures.sent if s.error.startswith("unavailable")]

        # The engine agrees with the log.
        assert_engine_agrees(engines["podman"], final)

        # The projection catches up and equals a fresh replay; the query service serves it.
        head = (await js.stream_info(subjects.LOG_STREAM)).state.last_seq
        projection = tmp_path / "data" / "projection.sqlite3"
        for _ in range(600):
            db = await connect(projection, readonly=True)
            try:
                if await checkpoint(db) >= head:
                    break
            finally:
                await db.close()
            await asyncio.sleep(0.1)
        replayed = await audit.replay(nc, projection)
        assert replayed["differences"] == [], replayed["differences"][:10]
        listed = {item["name"]: item["phase"] for item in await client.list()}
        assert {n: p for n, p in final.items() if p not in (None, "Deleted")} == {
            n: p for n, p in listed.items() if n in final and p != "Deleted"
        }

        phases = Counter(p for p in final.values())
        print(
            f"\nfaults: {len(figures.sent)} commands sent over {LANES} sandboxes "
            f"({dict(Counter(s.verb for s in figures.sent))}); {len(accepted)} accepted, "
            f"{len(figures.sent) - len(accepted) - len(unanswered)} refused, {len(unanswered)} unanswered; "
            f"{sum(figures.faults.values())} faults injected in {figures.fault_rounds} rounds "
            f"({dict(figures.faults)}); log {count} events; events lost 0, duplicated 0; "
            f"sandboxes stuck 0 (all settled {settle_time:.1f}s after the workload, bound {SETTLE_BOUND:g}s); "
            f"final phases {dict(phases)}; service starts { ({c: s.starts for c, s in services.items()}) }; "
            f"{time.monotonic() - started:.1f}s"
        )
        assert len(figures.sent) >= MIN_COMMANDS
        assert all(figures.faults[f] >= MIN_FAULT_ROUNDS for f in FAULTS), figures.faults
    finally:
        if follower is not None:
            await follower.stop()
        if client is not None:
            await client.close()
        if nc is not None:
            await nc.close()
        for service in services.values():
            await asyncio.to_thread(service.stop)
        server.stop()
