"""Node loss, in the spirit of Jepsen's NATS nemeses: a three-node JetStream cluster, every service
replicated in processes of its own, a mixed workload on real podman, and faults one after another.

The cluster's nodes are nats-servers of this test's own, routed into one JetStream cluster; the
log is kept on all three. Two state machines (``serve --only statemachine``), two projector and
query pairs, each on a SQLite file of its own (``serve --only projector,query``), one driver
worker and one reaper run against all three URLs. While LANES lanes drive at least MIN_COMMANDS
commands over LANES sandboxes (create, stop, start, delete, create again), these come in turn:

- ``kill -9`` of the node that leads the log, restarted on its port and data after a pause;
- SIGSTOP of another node for PAUSE seconds, then SIGCONT;
- ``kill -9`` of the state machine that applies the facts (the other takes them over), restarted
  after a pause;
- ``kill -9`` of a projector and query pair, restarted after a pause.

Then, checked as in tests/e2e/test_faults.py: every command that got an accepted reply has its
events in the log exactly once; every sandbox settles within SETTLE_BOUND seconds of the last
fault; the engine agrees with every phase; each projector replica equals a fresh replay of the
log. It prints, for each fault, the longest a command waited for its answer while the fault
lasted (the lanes' commands, and a touch sent every PROBE_EVERY seconds throughout; the target is
MAX_WAIT_TARGET), and how many commands were refused and how many retried.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from sandboxctl import audit
from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.runtime.embedded import NatsServer, PodmanService
from sandboxctl.services.projection import checkpoint, connect
from testing.serve import Service
from tests.conftest import Engine, until
from tests.e2e.test_faults import SETTLED, SLEEPER, Figures, Workload, assert_engine_agrees, assert_exactly_once
from tests.integration.test_replicas import nodes_of
from tests.logview import LogFollower

LANES = 30
MIN_COMMANDS = 500
PAUSE = 10.0  # seconds a node stays frozen
SETTLE_BOUND = 60.0
MAX_WAIT_TARGET = 5.0
PROBE_EVERY = 0.1
FAULTS = ("kill -9 the log's leader node", "SIGSTOP a node for 10 s", "kill -9 a state machine", "kill -9 a projector")


@dataclass
class Window:
    fault: str
    began: float
    ended: float = 0.0
    victim: str = ""


def facts_holder(services: dict[str, Service]) -> Service:
    """The state machine that applies the facts now: of those whose log last says it was pinned
    (bus/pull.py logs each pin it gets, drops or loses), the one pinned most recently."""

    def last_pinned(service: Service) -> str:
        lines = service.log_path.read_text(errors="replace").splitlines()
        pins = [i for i, line in enumerate(lines) if "pinned (" in line]
        dropped = [i for i, line in enumerate(lines) if "standing by" in line]
        if not pins or (dropped and dropped[-1] > pins[-1]):
            return ""
        return lines[pins[-1]][:23]  # its time, as the log writes it: later sorts later

    times = {name: last_pinned(s) for name, s in services.items() if name.startswith("statemachine")}
    holder = max(times, key=lambda name: times[name])
    assert times[holder], times
    return services[holder]


async def log_leader(js: Any, nodes: list[NatsServer]) -> NatsServer:
    """The node that leads the log's RAFT group now."""
    while True:
        try:
            leader = (await js.stream_info(subjects.LOG_STREAM)).cluster.leader
            if leader:
                return nodes[int(str(leader).rsplit("-n", 1)[1]) - 1]
        except Exception:
            pass
        await asyncio.sleep(0.2)


async def inject(
    nodes: list[NatsServer], services: dict[str, Service], js: Any, windows: list[Window], rng: random.Random
) -> None:
    for fault in FAULTS:
        await asyncio.sleep(rng.uniform(4.0, 6.0))
        window = Window(fault, time.monotonic())
        windows.append(window)
        print(f"node loss: {fault}", file=sys.stderr, flush=True)
        if fault.startswith("kill -9 the log's"):
            victim = await log_leader(js, nodes)
            assert victim.proc is not None
            victim.proc.kill()
            victim.proc.wait()
            await asyncio.sleep(rng.uniform(3.0, 5.0))
            await asyncio.to_thread(victim.start)
        elif fault.startswith("SIGSTOP"):
            frozen = nodes[rng.randrange(3)]
            assert frozen.proc is not None
            os.kill(frozen.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(PAUSE)
            os.kill(frozen.proc.pid, signal.SIGCONT)
        else:
            victim_service = facts_holder(services) if "state machine" in fault else services["projector-1"]
            window.victim = victim_service.name
            await asyncio.to_thread(victim_service.kill)
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            await asyncio.to_thread(victim_service.start)
        window.ended = time.monotonic()


@dataclass
class Probe:
    at: float
    waited: float
    error: str = ""


async def probe(client: SandboxClient, name: str, probes: list[Probe], done: asyncio.Event) -> None:
    """A touch of a Ready sandbox every PROBE_EVERY seconds until ``done``, each timed from send to
    answer: what a user of the control plane waits while a fault lasts, whatever the lanes do."""
    count = 0
    while not done.is_set():
        count += 1
        at = time.monotonic()
        try:
            await client.touch(name, command_id=f"probe:{name}:{count}")
            probes.append(Probe(at, time.monotonic() - at))
        except SandboxError as exc:
            probes.append(Probe(at, time.monotonic() - at, f"{exc.code}: {exc}"))
        await asyncio.sleep(PROBE_EVERY)


@pytest.mark.timeout(900)
async def test_a_replicated_control_plane_loses_nothing_and_keeps_answering_through_node_loss(
    tmp_path: Path, image: str, names, engines: dict[str, Engine], podman_service: PodmanService
) -> None:
    started = time.monotonic()
    nodes = nodes_of(tmp_path / "cluster")
    for node in nodes:
        node.start()
    urls = ",".join(node.url for node in nodes)
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOXCTL_")},
        "SANDBOXCTL_NATS_URL": urls,
        "SANDBOXCTL_RUN_DIR": str(tmp_path / "run"),
        "SANDBOXCTL_PODMAN_URL": podman_service.url,
        "SANDBOXCTL_DRIVERS": "podman",
        "SANDBOXCTL_DEFAULT_DRIVER": "podman",
    }

    def env(data: str) -> dict[str, str]:
        return {**base, "SANDBOXCTL_DATA_DIR": str(tmp_path / data)}

    services = {
        "statemachine-1": Service("statemachine", env("sm1"), tmp_path, "statemachine-1"),
        "statemachine-2": Service("statemachine", env("sm2"), tmp_path, "statemachine-2"),
        "projector-1": Service("projector,query", env("p1"), tmp_path, "projector-1"),
        "projector-2": Service("projector,query", env("p2"), tmp_path, "projector-2"),
        "worker": Service("worker", env("worker"), tmp_path, "worker"),
        "reaper": Service("reaper", env("reaper"), tmp_path, "reaper"),
    }
    figures = Figures()
    windows: list[Window] = []
    nc = client = follower = None
    try:
        for service in services.values():
            await asyncio.to_thread(service.start)
        options: dict[str, Any] = {
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.2,
            "ping_interval": 1,
            "max_outstanding_pings": 2,
        }
        nc = await nats.connect(urls.split(","), **options)
        js = nc.jetstream()
        client = await SandboxClient.connect(urls, actor="node-loss", **options)
        client.retries, client.request_timeout = 10, 5.0
        attempts = Counter[str]()
        request = client._request

        async def counted(subject: str, payload: bytes) -> Any:
            attempts[subject.split(".")[2]] += 1
            return await request(subject, payload)

        client._request = counted  # type: ignore[method-assign]
        follower = LogFollower(js).start()
        workload = Workload(client, follower, image, figures)
        lanes = [names.new("nl") for _ in range(LANES)]
        quota = -(-MIN_COMMANDS // LANES)
        rng = random.Random(20261201)

        prober = names.new("probe")
        await client.wait_for(prober, "Ready", (await client.create(prober, image, command=SLEEPER)).seq, timeout=60)
        probes: list[Probe] = []

        async def faults() -> None:
            try:
                await inject(nodes, services, js, windows, rng)
            finally:
                workload.faults_done.set()

        probing = asyncio.create_task(probe(client, prober, probes, workload.faults_done))
        await asyncio.gather(faults(), *(workload.lane(name, quota) for name in lanes))
        await probing
        last_fault = max(w.ended for w in windows)

        # Every sandbox settles within the bound of the last fault.
        head = (await js.stream_info(subjects.LOG_STREAM)).state.last_seq
        await until(lambda: follower.position >= head, "the log folded to its head", timeout=SETTLE_BOUND)
        final: dict[str, str | None] = {}
        for name in lanes:
            while True:
                _, phase = await workload.phase(name)
                if phase is None or phase in SETTLED or time.monotonic() - last_fault > SETTLE_BOUND:
                    final[name] = phase
                    break
                await asyncio.sleep(0.1)
        settled_after = time.monotonic() - last_fault
        stuck = {n: p for n, p in final.items() if p is not None and p not in SETTLED} | figures.stuck
        assert not stuck, f"stuck: {stuck}\n" + "\n\n".join(f"--- {s.name}\n{s.tail()}" for s in services.values())

        # Exactly once: every accepted command's events are in the log, once; the engine agrees.
        count = await assert_exactly_once(js, figures.sent)
        assert_engine_agrees(engines["podman"], final)

        # Each projector replica catches up and equals a fresh replay of the log.
        head = (await js.stream_info(subjects.LOG_STREAM)).state.last_seq
        for replica in ("p1", "p2"):
            projection = tmp_path / replica / "projection.sqlite3"
            deadline = time.monotonic() + 60
            while True:
                db = await connect(projection, readonly=True)
                try:
                    position = await checkpoint(db)
                finally:
                    await db.close()
                if position >= head or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            replayed = await audit.replay(nc, projection)
            assert replayed["differences"] == [], (replica, replayed["differences"][:10])

        # The figures: the longest wait for an answer while each fault lasted. A command in flight
        # when the fault began waited through it as much as one sent during it (on a loaded machine
        # every lane can be waiting on one sent just before), so both count.
        during = {
            w.fault: [
                (s.at, s.waited) for s in [*figures.sent, *probes] if s.at <= w.ended and s.at + s.waited >= w.began
            ]
            for w in windows
        }
        waits = {fault: max(waited for _, waited in sent) for fault, sent in during.items() if sent}
        probes_refused = [p for p in probes if p.error]
        refused = [s for s in figures.sent if s.error]
        retried = sum(attempts.values()) - len(figures.sent) - len(probes)
        print(
            f"\nnode loss: {len(figures.sent)} commands over {LANES} sandboxes "
            f"({dict(Counter(s.verb for s in figures.sent))}); {len(refused)} refused "
            f"({dict(Counter(s.error.split(':')[0] for s in refused))}), {retried} retries; "
            f"{len(probes)} probes (a touch every {PROBE_EVERY:g}s), {len(probes_refused)} refused; "
            f"log {count} events, lost 0, duplicated 0; all settled {settled_after:.1f}s after the last fault; "
            f"longest wait for an answer while each fault lasted: "
            + ", ".join(f"{fault}: {wait:.1f}s ({len(during[fault])} commands)" for fault, wait in waits.items())
            + f"; {time.monotonic() - started:.0f}s in all"
        )
        assert len(figures.sent) >= MIN_COMMANDS
        assert [w.fault for w in windows] == list(FAULTS)
        assert all(during.values()), {f: len(sent) for f, sent in during.items()}  # commands came during each
        assert not probes_refused, probes_refused[:5]
        # refused only because the command did not fit the phase (a lane decides on the log as its
        # follower has read it so far, which a fault can hold back): never unavailable or internal
        fitting = ("failed_precondition", "conflict", "already_exists", "not_found")
        assert not [s for s in refused if not s.error.startswith(fitting)], refused[:5]
    finally:
        if follower is not None:
            await follower.stop()
        if client is not None:
            await client.close()
        if nc is not None:
            await nc.close()
        for service in services.values():
            await asyncio.to_thread(service.stop)
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)
            node.stop()
