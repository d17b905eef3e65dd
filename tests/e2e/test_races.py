"""Conflicting commands from several processes at the same instant, against a real
nats-server, real podman and two state-machine instances in the queue group.

Three OS processes, each with its own NATS connection, fire the commands of a
round at one shared wall-clock instant; the queue group spreads them over the
plane's state machine and a twin with a cache of its own, so racing commands
are decided from different caches and only the log's sequence guard can keep
two of them from both winning.

Round kinds, each three commands at one sandbox:

- double create: ``create`` x3 with different command ids;
- stop vs start: ``stop, start, stop`` (from Ready) or ``start, stop, start``
  (from Stopped), so the doubled verb also races itself;
- delete vs start: ``delete, start, start``.

Every lane runs, twice, on one sandbox name (created again after its delete), a program of
*settled* rounds, fired once the sandbox is in a phase without engine work
pending: double create, five stop vs start, delete vs start. Each settled
round is followed at once, without waiting for the engine, by FOLLOW_UPS
rounds on the phase it left (Provisioning, Stopping, Starting, Deleting): they
race the commands against each other and against the engine's fact landing in
the log (a start can win the moment Stopped is appended, a stop the moment
Ready is). Races are decided before any engine work, which is why the many
rounds stay cheap; the engine only limits how often a settled round can be
fired.

Whenever a command wins, the process that sent it at once sends a *chaser*
(start after a stop or create, stop after a start or delete) with no barrier:
whichever instance it reaches must already see the win.

Counts: 20 lanes x 2 sandboxes x 7 settled rounds = 280 (40 double create,
200 stop vs start, 40 delete vs start), each followed by 3 follow-ups (120
double create, 720 stop vs start): 1,120 rounds, 3,360 commands plus the
chasers; at least 1,000 rounds are required. A lane's second sandbox reuses
its first one's name, created again the moment the delete is done.

Checked, from the replies and the log after all rounds:

- one winner per log position: every event a race command caused is claimed
  by exactly one reply (accepted, ``appended`` 1, ``seq`` = its position), and
  the phase before it allows the verb;
- every loser says why and was right at some moment of its round: an accepted
  no-op names a phase and seq the sandbox really had; ``failed_precondition``
  names a phase that forbids the verb; ``already_exists`` a live phase;
  ``not_found`` a deleted sandbox; ``conflict`` says the sandbox kept changing;
- a settled round's first log position goes to the contested verb (stop from
  Ready, start from Stopped, create from nothing or Deleted, delete or start
  from Stopped, delete from Ready), and the delete of a delete-vs-start round
  always wins a position;
- a chaser's answer reflects at least the log position its shot won;
- ``sandboxctl.audit.verify`` finds no violation, no sandbox failed, and every
  sandbox's chain ends Deleted.

- no Ready names a run that had already stopped or exited.

Any failure fails the test with the troubled sandboxes' log events and driver
facts. The tests at the bottom pin, deterministically, the product bugs these
races found under load (all fixed): a name deleted and at once created again
lost its new container (to the old delete's volume removal, or to a
reconciliation), and a late fact of an earlier run made a Starting sandbox
Ready on that dead run, then failed it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

import sandboxctl.services.statemachine as statemachine_module
import sandboxctl.services.worker as worker_module
from sandboxctl import audit
from sandboxctl.bus import reading
from sandboxctl.bus.eventlog import publish_fact
from sandboxctl.client import AlreadyExists, SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, now, type_name
from sandboxctl.events.facts import ContainerExited, ContainerStarted
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from sandboxctl.services.statemachine import FACTS_CONSUMER, StateMachineService
from sandboxctl.services.worker import DriverWorker
from tests.conftest import ROOT
from tests.logview import event_kind, facts_of, phase_after

PROCESSES = 3
LANES = 20
SANDBOXES_PER_LANE = 2
PROGRAM = ["double create", *["stop vs start"] * 5, "delete vs start"]
FOLLOW_UPS = 3
MIN_ROUNDS = 1000
LEAD = 0.03  # seconds between handing a round to the processes and firing it
REQUEST_TIMEOUT = 20.0
SETTLE_TIMEOUT = 60.0
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]

# The lifecycle rules, written out from docs/architecture.md rather than taken from the decider.
ALIVE = frozenset({"Provisioning", "Ready", "Stopping", "Stopped", "Starting", "Error", "Deleting"})
TRANSIENT = frozenset({"Provisioning", "Stopping", "Starting", "Deleting"})
WINS_FROM: dict[str, frozenset[str | None]] = {
    "create": frozenset({None, "Deleted"}),
    "stop": frozenset({"Ready"}),
    "start": frozenset({"Stopped", "Error"}),
    "delete": frozenset(ALIVE - {"Deleting"}),
}
NOOP_IN: dict[str, frozenset[str]] = {
    "create": frozenset(),
    "stop": frozenset({"Stopping", "Stopped"}),
    "start": frozenset({"Starting", "Ready"}),
    "delete": frozenset({"Deleting", "Deleted"}),
}
APPENDS = {"create": "created", "stop": "stop_requested", "start": "start_requested", "delete": "delete_requested"}


# What a process sends the instant its command won: refused in the phase the win made.
CHASE = {"create": "start", "stop": "start", "start": "stop", "delete": "stop"}
REFUSED = re.compile(r"^sandbox (?P<name>\S+) is (?P<phase>\w+); (?P<verb>\w+) is allowed in .+$")
EXISTS = re.compile(r"^sandbox (?P<name>\S+) already exists \((?P<phase>\w+)\)$")

# A child process: reads rounds on stdin, fires each at its instant, writes each reply on stdout.
CHILD = r"""
import asyncio, json, sys, time
import nats

async def main(url, index):
    nc = await nats.connect(url, name=f"race-{index}", max_reconnect_attempts=-1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending = set()

    def emit(record):
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    async def ask(subject, payload, timeout):
        sent = time.time()
        try:
            msg = await nc.request(subject, payload.encode(), timeout=timeout)
            return {"sent": sent, "reply": msg.data.decode()}
        except Exception as exc:
            return {"sent": sent, "error": repr(exc)}

    async def fire(job):
        delay = job["at"] - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        record = {"id": job["id"], **await ask(job["subject"], job["payload"], job["timeout"])}
        chase = job.get("chase")
        if chase and json.loads(record.get("reply") or "{}").get("appended"):
            # The instant a command wins, a command that must see the win, to either instance.
            record["chase"] = await ask(chase["subject"], chase["payload"], job["timeout"])
        emit(record)

    emit({"ready": index})
    while line := await reader.readline():
        task = asyncio.create_task(fire(json.loads(line)))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    await nc.drain()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


# (process, subject, payload, the command to chase a win with)
Job = tuple[int, str, bytes, tuple[str, bytes] | None]


class Fleet:
    """The sending processes, each with a NATS connection of its own."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.readers: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls, url: str, count: int) -> Fleet:
        fleet = cls([])
        for index in range(count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CHILD,
                url,
                str(index),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            fleet.procs.append(proc)
        for index, proc in enumerate(fleet.procs):
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert json.loads(line) == {"ready": index}, line
            fleet.readers.append(asyncio.create_task(fleet._read(proc)))
        return fleet

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            record = json.loads(line)
            future = self.waiting.pop(record["id"], None)
            if future is not None and not future.done():
                future.set_result(record)

    async def fire(self, jobs: list[Job], at: float) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        futures = []
        for proc_index, subject, payload, chase in jobs:
            job_id = uuid.uuid4().hex
            futures.append(self.waiting.setdefault(job_id, loop.create_future()))
            job = {"id": job_id, "at": at, "subject": subject, "payload": payload.decode(), "timeout": REQUEST_TIMEOUT}
            if chase is not None:
                job["chase"] = {"subject": chase[0], "payload": chase[1].decode()}
            stdin = self.procs[proc_index].stdin
            assert stdin is not None
            stdin.write(json.dumps(job).encode() + b"\n")
        await asyncio.gather(*(p.stdin.drain() for p in self.procs if p.stdin is not None))
        return list(await asyncio.wait_for(asyncio.gather(*futures), REQUEST_TIMEOUT + 15))

    async def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


@dataclass
class Shot:
    verb: str
    command_id: str
    proc: int
    sent: float = 0.0
    reply: dict[str, Any] | None = None
    error: str = ""
    chases: Shot | None = None  # for a chaser: the winning shot it was sent after


@dataclass
class Round:
    kind: str
    settled: bool
    name: str
    before_seq: int
    shots: list[Shot]
    head_seq: int = 0


@dataclass
class Tally:
    winners: int = 0
    noop: int = 0
    failed_precondition: int = 0
    already_exists: int = 0
    not_found: int = 0
    conflict: int = 0
    problems: list[str] = field(default_factory=list)


class Races:
    def __init__(self, plane: ControlPlane, fleet: Fleet, image: str) -> None:
        self.plane = plane
        self.js = plane.statemachine.js
        self.fleet = fleet
        self.image = image
        self.random = random.Random(20261129)
        self.rounds: list[Round] = []
        self.stuck: dict[str, str] = {}

    def phase(self, name: str) -> tuple[int, str | None]:
        state = self.plane.statemachine.states.get(name)
        return (state.seq, state.phase.value) if state else (0, None)

    async def settled(self, name: str) -> str | None:
        """The phase once no engine work is pending; a phase it is stuck in is recorded and returned."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT
        while True:
            _, phase = self.phase(name)
            if phase not in TRANSIENT:
                return phase
            if loop.time() > deadline:
                self.stuck[name] = f"{phase} for {SETTLE_TIMEOUT:g}s"
                return phase
            await asyncio.sleep(0.01)

    async def head(self, name: str) -> int:
        try:
            return int((await self.js.get_last_msg(subjects.LOG_STREAM, subjects.log(name))).seq or 0)
        except NotFoundError:
            return 0

    def payload(self, verb: str, name: str, command_id: str, proc: int) -> bytes:
        body: dict[str, Any] = {
            "type": f"sandboxctl.command.{verb}.v1",
            "name": name,
            "command_id": command_id,
            "actor": f"race-{proc}",
        }
        if verb == "create":
            body |= {"image": self.image, "driver": "podman", "command": SLEEPER}
        if verb == "stop":
            body["timeout"] = 5
        return json.dumps(body).encode()

    async def fire(self, kind: str, settled: bool, name: str, verbs: list[str]) -> Round:
        # The log's head before sending: every reply must reflect at least this much of the log.
        before_seq = await self.head(name)
        procs = self.random.sample(range(PROCESSES), len(verbs))
        shots = [
            Shot(verb, f"race:{name}:{len(self.rounds)}:{i}:{uuid.uuid4().hex[:8]}", p)
            for i, (verb, p) in enumerate(zip(verbs, procs, strict=True))
        ]
        round_ = Round(kind, settled, name, before_seq, shots)
        self.rounds.append(round_)
        chasers = [Shot(CHASE[s.verb], f"{s.command_id}:chase", s.proc, chases=s) for s in shots]
        jobs: list[Job] = [
            (
                s.proc,
                subjects.command(s.verb),
                self.payload(s.verb, name, s.command_id, s.proc),
                (subjects.command(c.verb), self.payload(c.verb, name, c.command_id, c.proc)),
            )
            for s, c in zip(shots, chasers, strict=True)
        ]
        results = await self.fleet.fire(jobs, time.time() + LEAD)
        for shot, chaser, result in zip(list(shots), chasers, results, strict=True):
            shot.sent = result["sent"]
            shot.reply = json.loads(result["reply"]) if "reply" in result else None
            shot.error = result.get("error", "")
            if "chase" in result:
                chaser.sent = result["chase"]["sent"]
                chaser.reply = json.loads(result["chase"]["reply"]) if "reply" in result["chase"] else None
                chaser.error = result["chase"].get("error", "")
                shots.append(chaser)
        round_.head_seq = await self.head(name)
        return round_

    @staticmethod
    def stop_vs_start(phase: str | None) -> list[str]:
        return (
            ["stop", "start", "stop"] if phase in ("Ready", "Starting", "Provisioning") else ["start", "stop", "start"]
        )

    async def lane(self, sandboxes: list[str]) -> None:
        for name in sandboxes:
            for kind in PROGRAM:
                phase = await self.settled(name)
                if name in self.stuck:
                    return  # reported after the rounds are checked against the log
                if kind == "double create":
                    verbs = ["create"] * 3
                elif kind == "stop vs start":
                    verbs = self.stop_vs_start(phase)
                else:
                    verbs = ["delete", "start", "start"]
                await self.fire(kind, True, name, verbs)
                for _ in range(FOLLOW_UPS):
                    if kind == "double create":
                        await self.fire("double create", False, name, ["create"] * 3)
                    else:
                        await self.fire("stop vs start", False, name, self.stop_vs_start(self.phase(name)[1]))
            await self.settled(name)


# -- checking, from the log --------------------------------------------------------------


class Chain:
    """One sandbox's events, with the phase after each (seq, phase)."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.phases: list[str] = []
        self.events: dict[int, Any] = {}

    def add(self, seq: int, envelope: Any) -> None:
        self.seqs.append(seq)
        self.phases.append(phase_after(envelope.type, self.phases[-1] if self.phases else None) or "")
        self.events[seq] = envelope

    def phase_at(self, seq: int) -> str | None:
        """The phase after the last event at or before ``seq`` (None before the first)."""
        found = None
        for s, p in zip(self.seqs, self.phases, strict=True):
            if s > seq:
                break
            found = p
        return found

    def phase_before(self, seq: int) -> str | None:
        index = self.seqs.index(seq)
        return self.phases[index - 1] if index else None

    def window(self, start: int, end: int) -> list[tuple[int, str | None]]:
        return [(start, self.phase_at(start))] + [
            (s, p) for s, p in zip(self.seqs, self.phases, strict=True) if start < s <= end
        ]

    def first_after(self, seq: int) -> int | None:
        return next((s for s in self.seqs if s > seq), None)

    def ready_on_an_exited_run(self) -> list[int]:
        """Ready events naming a run (incarnation) that had already stopped or exited: the bug of
        late facts (test_late_facts_of_an_earlier_run_move_nothing)."""
        exited: set[str] = set()
        current = ""
        found = []
        for seq in self.seqs:
            event = self.events[seq]
            kind = event_kind(event.type)
            if kind == "ready":
                current = event.data.incarnation
                if current in exited:
                    found.append(seq)
            elif kind == "stopped" or (kind == "failed" and event.data.kind == "exited"):
                exited.add(current)
        return found


def check_round(round_: Round, chain: Chain, tally: Tally, claimed: dict[int, str]) -> None:
    name = round_.name
    before_phase = chain.phase_at(round_.before_seq)

    log = chain.window(round_.before_seq, round_.head_seq)

    def problem(shot: Shot, what: str) -> None:
        tally.problems.append(
            f"{round_.kind} on {name} from {before_phase}@{round_.before_seq} (log {log}): "
            f"{shot.verb} {shot.command_id}: {what}; reply {shot.reply or shot.error}"
        )

    for shot in round_.shots:
        # A chaser was sent after its shot's win was acknowledged, so it must see at least that.
        start = max(round_.before_seq, shot.chases.reply["seq"]) if shot.chases and shot.chases.reply else None
        window = chain.window(start or round_.before_seq, round_.head_seq)
        phases = {p for _, p in window}
        reply = shot.reply
        if reply is None:
            problem(shot, "no reply")
            continue
        error = reply.get("error")
        if error is None:
            if not reply.get("accepted"):
                problem(shot, "neither accepted nor an error")
            elif reply.get("appended", 0) > 0:
                tally.winners += 1
                seq = reply.get("seq", 0)
                event = chain.events.get(seq)
                if reply["appended"] != 1 or event is None:
                    problem(shot, "claims an append the log does not have")
                    continue
                if seq in claimed:
                    problem(shot, f"log position {seq} already claimed by {claimed[seq]}")
                claimed[seq] = shot.command_id
                if event.causationid != shot.command_id or event_kind(event.type) != APPENDS[shot.verb]:
                    problem(shot, f"log position {seq} holds {event.type} of {event.causationid}")
                if not round_.before_seq < seq <= round_.head_seq:
                    problem(shot, f"won position {seq} outside its round")
                if chain.phase_before(seq) not in WINS_FROM[shot.verb]:
                    problem(shot, f"won from {chain.phase_before(seq)}, where {shot.verb} may not append")
                if reply.get("phase") != chain.phase_at(seq):
                    problem(shot, f"reply phase {reply.get('phase')} but the log says {chain.phase_at(seq)}")
            else:
                tally.noop += 1
                said = (reply.get("seq", 0), reply.get("phase") or None)
                if said[1] not in NOOP_IN[shot.verb]:
                    problem(shot, f"no-op in {said[1]}, where {shot.verb} is not one")
                elif said not in window:
                    problem(shot, f"no-op at {said}, which the sandbox never was during the round")
            continue
        code, message = error.get("code"), error.get("message", "")
        if code == "conflict":
            tally.conflict += 1
            if "kept changing" not in message:
                problem(shot, "conflict without saying why")
        elif code == "failed_precondition":
            tally.failed_precondition += 1
            said = REFUSED.match(message)
            if said is None or said["name"] != name or said["verb"] != shot.verb:
                problem(shot, "failed_precondition that does not name the phase")
            elif said["phase"] not in phases:
                problem(shot, f"refused in {said['phase']}, which the sandbox never was during the round")
            elif said["phase"] in WINS_FROM[shot.verb] | NOOP_IN[shot.verb] or shot.verb not in ("stop", "start"):
                problem(shot, f"refused in {said['phase']}, where {shot.verb} is allowed")
        elif code == "already_exists":
            tally.already_exists += 1
            said = EXISTS.match(message)
            if shot.verb != "create" or said is None or said["name"] != name:
                problem(shot, "already_exists that does not name the phase")
            elif said["phase"] not in phases or said["phase"] not in ALIVE:
                problem(shot, f"already exists in {said['phase']}, which the sandbox never was during the round")
        elif code == "not_found":
            tally.not_found += 1
            if shot.verb not in ("stop", "start") or not phases & {None, "Deleted"}:
                problem(shot, "not_found while the sandbox existed")
        else:
            problem(shot, f"unexpected code {code}")

    if round_.settled:
        first = chain.first_after(round_.before_seq)
        event = chain.events.get(first) if first is not None else None
        mine = {s.command_id: s.verb for s in round_.shots if s.chases is None}
        contested = {
            "double create": {"create"},
            "stop vs start": {"stop"} if before_phase == "Ready" else {"start"},
            "delete vs start": {"delete"} if before_phase == "Ready" else {"delete", "start"},
        }[round_.kind]
        if event is None or mine.get(event.causationid) not in contested:
            tally.problems.append(
                f"settled {round_.kind} on {name} from {before_phase}: first log position went to "
                f"{event and (event.type, event.causationid)}, not to its {sorted(contested)}"
            )
        if round_.kind == "delete vs start":
            deletes = [s for s in round_.shots if s.verb == "delete"]
            if not all(s.reply and s.reply.get("appended") == 1 for s in deletes):
                tally.problems.append(f"delete vs start on {name}: the delete did not win a position: {deletes}")


async def story(js: Any, name: str) -> str:
    """One sandbox's log events and driver facts, in time order: what a failure message needs."""
    lines: list[tuple[str, str]] = []
    async for seq, envelope, _ in reading.read_events(js, name):
        if not isinstance(envelope, Exception):
            what = f"log {seq} {event_kind(envelope.type)} by {envelope.actor} cause {envelope.causationid}"
            lines.append((envelope.time.isoformat(), f"{what} {msgspec.to_builtins(envelope.data)}"))
    for seq, envelope in await facts_of(js, name):
        what = f"fact {seq} {event_kind(envelope.type)} id {envelope.id}"
        lines.append((envelope.time.isoformat(), f"{what} {msgspec.to_builtins(envelope.data)}"))
    return "\n".join(f"  {t} {line}" for t, line in sorted(lines))


async def test_conflicting_commands_from_several_processes_have_one_winner_per_log_position(
    config: Config, plane: ControlPlane, names, image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    guard_conflicts = Counter[str]()
    real_append = statemachine_module.append

    async def counting_append(js: Any, envelope: Any, expected_seq: int, **options: Any) -> Any:
        try:
            return await real_append(js, envelope, expected_seq, **options)
        except statemachine_module.SequenceConflict:
            guard_conflicts[envelope.subject] += 1
            raise

    monkeypatch.setattr(statemachine_module, "append", counting_append)

    twin_nc = await nats.connect(config.nats_url, name="statemachine-twin")
    twin = StateMachineService(twin_nc, config.drivers, config.default_driver, place=True)
    await twin.start()
    handled = Counter[str]()
    for label, service in (("plane", plane.statemachine), ("twin", twin)):

        async def handle(subject: str, payload: bytes, _label: str = label, _real: Any = service.handle) -> Any:
            handled[_label] += 1
            return await _real(subject, payload)

        monkeypatch.setattr(service, "handle", handle)

    fleet = await Fleet.start(config.nats_url, PROCESSES)
    sweeps = sum(w.reconciliations for w in plane.workers)
    races = Races(plane, fleet, image)
    lanes = [[names.new("race")] * SANDBOXES_PER_LANE for _ in range(LANES)]
    sandboxes = sorted({name for lane in lanes for name in lane})
    try:
        await asyncio.gather(*(races.lane(lane) for lane in lanes))
    finally:
        await fleet.close()
        await twin.stop()
        await twin_nc.close()
    ran = time.monotonic() - started

    # Walk the log.
    js = plane.statemachine.js
    count, violations = await audit.verify(js)
    chains: dict[str, Chain] = {}
    failures = []
    async for seq, envelope, msg in reading.read_events(js):
        assert not isinstance(envelope, Exception), f"unreadable log entry at {seq}: {envelope}"
        chains.setdefault(subjects.name_of(msg.subject), Chain()).add(seq, envelope)
        if event_kind(envelope.type) == "failed":
            failures.append((seq, envelope.subject, envelope.data))
    assert set(chains) <= set(sandboxes)

    tally = Tally()
    claimed: dict[int, str] = {}
    for round_ in races.rounds:
        check_round(round_, chains.setdefault(round_.name, Chain()), tally, claimed)
    assert tally.problems == [], "\n".join(tally.problems[:20])
    assert violations == [], violations[:10]
    dead_runs = {name: seqs for name, chain in chains.items() if (seqs := chain.ready_on_an_exited_run())}
    if failures or races.stuck or dead_runs:
        told = [
            await story(js, name) for name in sorted({f[1] for f in failures} | set(races.stuck) | set(dead_runs))[:3]
        ]
        pytest.fail(
            f"failed: {failures[:10]}; stuck: {races.stuck}; Ready on a run that had ended: {dead_runs}\n"
            + "\n\n".join(told)
        )
    assert set(chains) == set(sandboxes), f"never created: {sorted(set(sandboxes) - set(chains))}"
    for name in sandboxes:
        assert chains[name].phases[-1] == "Deleted", f"{name} ended {chains[name].phases[-1]}"

    # Every event a race command caused has exactly one winning reply.
    ours = {s.command_id for r in races.rounds for s in r.shots}
    caused = [(e.causationid, seq) for c in chains.values() for seq, e in c.events.items() if e.causationid in ours]
    assert sorted(seq for _, seq in caused) == sorted(claimed), "log and winning replies disagree"
    assert {cid: seq for cid, seq in caused} == {cid: seq for seq, cid in claimed.items()}
    others = {event_kind(e.type) for c in chains.values() for e in c.events.values() if e.causationid not in ours}
    assert others <= {"ready", "stopped", "deleted"}, others

    rounds = races.rounds
    commands = sum(len(r.shots) for r in rounds)
    losers = commands - tally.winners
    assert len(rounds) >= MIN_ROUNDS
    assert tally.noop + tally.failed_precondition + tally.already_exists + tally.not_found + tally.conflict == losers
    assert handled["plane"] > 0 and handled["twin"] > 0, handled
    chasers = sum(1 for r in rounds for s in r.shots if s.chases)
    fired = [[s.sent for s in r.shots if s.chases is None] for r in rounds]
    spread = sorted(max(sent) - min(sent) for sent in fired)
    kinds = Counter(f"{r.kind} ({'settled' if r.settled else 'follow-up'})" for r in rounds)
    contested = sum(1 for r in rounds if sum(bool(s.reply and s.reply.get("appended")) for s in r.shots))
    print(
        f"\nraces: {len(rounds)} rounds, {commands} commands, {tally.winners} winners, {losers} losers "
        f"(conflict {tally.conflict}, failed_precondition {tally.failed_precondition}, "
        f"already_exists {tally.already_exists}, not_found {tally.not_found}, no-op {tally.noop}), "
        f"log violations {len(violations)}"
    )
    print(
        f"races: {dict(sorted(kinds.items()))}; {contested} rounds had a winner; {chasers} chasers "
        f"(a command sent the instant a win was acknowledged, included above); "
        f"{sum(guard_conflicts.values())} appends refused by the sequence guard; commands handled "
        f"plane {handled['plane']}, twin {handled['twin']}; {PROCESSES} processes fired within "
        f"{statistics.median(spread) * 1000:.1f} ms (median), {spread[len(spread) * 95 // 100] * 1000:.1f} ms (p95); "
        f"log {count} events; {LANES * SANDBOXES_PER_LANE} sandboxes on {len(sandboxes)} names; "
        f"{sum(w.reconciliations for w in plane.workers) - sweeps} engine reconciliations during the races; "
        f"{ran:.1f}s"
    )


async def test_a_name_created_again_right_after_delete_keeps_its_container(
    plane: ControlPlane, client: SandboxClient, names, image: str, engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen once in the races above under heavy load: the watcher saw the old container go and
    its removal made the sandbox Deleted while the delete work order was still removing the
    workspace by name, so the name's next sandbox lost its volume and container. Now only the
    delete's own report, once the workspace is gone too, ends a delete; and a delete removes
    only what carries its sandbox id. Made deterministic with a slow engine: the old sandbox's
    volume removal is held until the watcher's removal report has been taken by the state
    machine. Nothing is faked: real podman does every step."""
    name = names.new("reuse")
    await client.create(name, image, command=SLEEPER, command_id=f"{name}-first")
    await client.wait_for(name, "Ready")
    states = plane.statemachine.states
    js = plane.statemachine.js
    driver = next(w for w in plane.workers if w.driver.name == "podman").driver
    volumes = driver.client.volumes
    real_remove = volumes.remove
    holding, release = threading.Event(), threading.Event()

    def slow_remove(*args: Any, **kwargs: Any) -> Any:
        holding.set()
        release.wait(30)
        return real_remove(*args, **kwargs)

    monkeypatch.setattr(volumes, "remove", slow_remove)
    await client.delete(name)
    assert await asyncio.to_thread(holding.wait, 30)  # the container is gone, the workspace not yet
    watcher_seq = 0
    # Up to 40 s for the watcher's removal report (podman's event backend lags under load), then
    # for the state machine to take it.
    for _ in range(800):
        if not watcher_seq:
            for seq, fact in await facts_of(js, name):
                if event_kind(fact.type) == "container_removed" and not fact.causationid:
                    watcher_seq = seq
        else:
            info = await js.consumer_info(subjects.FACTS_STREAM, FACTS_CONSUMER)
            if info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= watcher_seq:
                break
        await asyncio.sleep(0.05)
    assert watcher_seq, "the watcher never reported the container's removal"
    assert states[name].phase.value == "Deleting", "a watcher's removal ended the delete before the workspace went"
    with pytest.raises(AlreadyExists, match="Deleting"):
        await client.create(name, image, command=SLEEPER, command_id=f"{name}-too-early")

    release.set()
    await client.wait_for(name, "Deleted")
    assert not engines["podman"].volume_exists(name)
    second = await client.create(name, image, command=SLEEPER, command_id=f"{name}-second")
    await client.wait_for(name, "Ready", second.seq)
    # The old delete, delivered again (at least once), must leave the new sandbox alone.
    assert driver.delete(name, f"{name}-first") == ""
    state = states[name]
    assert (state.sandbox_id, state.phase.value, state.last_error) == (f"{name}-second", "Ready", "")
    assert engines["podman"].container_exists(name) and engines["podman"].volume_exists(name)


async def test_reconciliation_does_not_act_on_a_phase_that_has_passed(
    plane: ControlPlane, client: SandboxClient, names, image: str, engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in the races under load (facts ``<old id>:<seq>:reconcile:0`` removing the new container);
    made deterministic with a slow engine: the sweep, run as when the engine's event stream
    reconnects, reads the log while the old sandbox is Deleting, and its container listing
    returns only once the name's next sandbox is Ready. Real podman does every step."""
    name = names.new("sweep")
    await client.create(name, image, command=SLEEPER, command_id=f"{name}-first")
    await client.wait_for(name, "Ready")
    states = plane.statemachine.states
    worker = next(w for w in plane.workers if w.driver.name == "podman")
    snapshot = threading.Event()

    def next_sandbox_ready() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = states.get(name)
            if state is not None and state.sandbox_id == f"{name}-second" and state.phase.value == "Ready":
                return
            time.sleep(0.02)

    real_load, real_delete, real_list = worker_module.load_states, worker.driver.delete, worker.driver.list_managed

    async def load_states(js: Any) -> Any:
        states_read = await real_load(js)
        snapshot.set()
        return states_read

    def delete(sandbox: str, sandbox_id: str = "") -> str:
        snapshot.wait(10)  # the delete work order lets the sweep read the log first
        return real_delete(sandbox, sandbox_id)

    def list_managed() -> Any:
        next_sandbox_ready()
        return real_list()

    monkeypatch.setattr(worker_module, "load_states", load_states)
    monkeypatch.setattr(worker.driver, "delete", delete)
    monkeypatch.setattr(worker.driver, "list_managed", list_managed)
    await client.delete(name)
    sweep = asyncio.create_task(worker.reconcile())
    await client.wait_for(name, "Deleted")
    second = await client.create(name, image, command=SLEEPER, command_id=f"{name}-second")
    await client.wait_for(name, "Ready", second.seq)
    await asyncio.wait_for(sweep, 60)
    for _ in range(200):  # up to 10 s for the watcher to report what the sweep did
        if states[name].phase.value != "Ready":
            break
        await asyncio.sleep(0.05)
    state = states[name]
    assert (state.sandbox_id, state.phase.value, state.last_error) == (f"{name}-second", "Ready", "")
    assert engines["podman"].container_exists(name)


async def test_late_facts_of_an_earlier_run_move_nothing(
    plane: ControlPlane, client: SandboxClient, names, image: str, engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in the races (twin state machines, load): the watcher's ``container_started`` of run I1,
    published while Stopping, was applied only after the stop completed and a start won, so in
    Starting it read as the new run: Ready on I1; then I1's ``container_exited`` failed the sandbox.
    Fixed by recording the run that ended (``SandboxState.ended``). Made deterministic by holding
    the engine's start and publishing the watcher's two late copies
    (new fact ids, same content) while the sandbox is Starting."""
    name = names.new("late")
    await client.create(name, image, command=SLEEPER)
    await client.wait_for(name, "Ready")
    js = plane.statemachine.js
    first = plane.statemachine.states[name]
    container = json.loads(engines["podman"]("container", "inspect", f"sandboxctl-{name}").stdout)[0]["Id"]
    await client.stop(name)
    await client.wait_for(name, "Stopped")

    worker = next(w for w in plane.workers if w.driver.name == "podman")
    real_start, release = worker.driver.start, threading.Event()

    def held_start(sandbox: str, sandbox_id: str, launched: Any = None) -> Any:
        release.wait(30)
        return real_start(sandbox, sandbox_id, launched=launched)

    monkeypatch.setattr(worker.driver, "start", held_start)
    started = await client.start(name)
    assert started.phase == "Starting"
    last = 0
    for kind, fact in (
        (
            "started",
            ContainerStarted(container_id=container, sandbox_id=first.sandbox_id, incarnation=first.incarnation),
        ),
        (
            "exited",
            ContainerExited(
                container_id=container, sandbox_id=first.sandbox_id, exit_code=0, incarnation=first.incarnation
            ),
        ),
    ):
        source = f"sandboxctl/driver/{worker.driver.name}"
        envelope = Envelope(
            id=f"{container}:{first.incarnation}:{kind}:late-copy",
            type=type_name(type(fact)),
            source=source,
            subject=name,
            time=now(),
            data=fact,
            actor=source,
        )
        last = (await publish_fact(js, envelope, worker.host)).seq
    for _ in range(200):  # until the state machine has taken both (acknowledged them)
        info = await js.consumer_info(subjects.FACTS_STREAM, FACTS_CONSUMER)
        if info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= last:
            break
        await asyncio.sleep(0.05)
    release.set()
    await client.wait_for(name, "Ready", started.seq)
    after = [e for e in await reading.history(js, name) if e["seq"] > started.seq]
    assert [(event_kind(e["type"]), e["data"].get("incarnation")) for e in after] == [
        ("ready", plane.statemachine.states[name].incarnation)
    ], after
    assert plane.statemachine.states[name].incarnation != first.incarnation


async def test_a_stop_delivered_again_after_a_start_won_leaves_the_new_run_alone(
    plane: ControlPlane, client: SandboxClient, names, image: str, engines
) -> None:
    """At least once: a worker that died before acknowledging a stop has it delivered again to the
    next worker, perhaps after a start has won. Run then, the stop would kill the new run (and the
    sandbox would fail). Here JetStream really redelivers the old stop (fetched, nak'd, fetched
    again) to a worker that never saw the start: it must find the later request in the log and
    skip the order."""
    name = names.new("again")
    await client.create(name, image, command=SLEEPER)
    await client.wait_for(name, "Ready")
    stop = await client.stop(name, timeout=5)
    await client.wait_for(name, "Stopped", stop.seq)
    start = await client.start(name)
    await client.wait_for(name, "Ready", start.seq)
    running = engines["podman"].state(name)["StartedAt"]

    js = plane.statemachine.js
    psub = await js.pull_subscribe(
        subjects.log(name),
        durable=f"redeliver-{uuid.uuid4().hex[:8]}",
        stream=subjects.LOG_STREAM,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=stop.seq, ack_wait=30, max_ack_pending=1
        ),
    )
    (first,) = await psub.fetch(1, timeout=5)
    await first.nak()
    (again,) = await psub.fetch(1, timeout=5)
    assert again.metadata.sequence.stream == stop.seq and again.metadata.num_delivered == 2

    driver = next(w for w in plane.workers if w.driver.name == "podman").driver
    # knows nothing of the start
    fresh = DriverWorker(await nats.connect(plane.config.nats_url), driver, host=plane.config.host)
    try:
        await fresh._handle(again)
    finally:
        await fresh.nc.close()
    state = engines["podman"].state(name)
    assert state["Running"] and state["StartedAt"] == running, "the old stop ran on the new run"
    assert plane.statemachine.states[name].phase.value == "Ready"
