"""A hostile machine, bounded to a few minutes: ``sandboxctl up`` with its data directory on a
small filesystem that fills up and is freed again, its nats-server frozen with SIGSTOP and
thawed, and its engine's API service frozen in the middle of stops and thawed.

It must end with no acknowledged event lost (every command answered ``accepted`` has its events
in the log where its reply said), every service alive or restarted by its supervisor, and every
sandbox's phase equal to what the engine shows within 60 s after the last fault ends. The
figures are printed for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.events.envelope import new_id
from sandboxctl.runtime.embedded import free_port
from tests.conftest import cli_process, podman
from tests.uprun import Up, fill, up_env

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"]
SANDBOXES = 6
CONVERGE = 60.0  # seconds after the last fault for every phase to equal the engine's


@dataclass
class Ledger:
    """Every command sent during the run and what it was answered."""

    acknowledged: list[tuple[str, int, str]] = field(default_factory=list)  # (sandbox, seq, command_id)
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (sandbox, command_id): no answer came
    answers: Counter[str] = field(default_factory=Counter)

    async def send(self, client: SandboxClient, verb: str, name: str) -> None:
        command_id = f"hm-{new_id()[:12]}"
        try:
            if verb == "stop":
                reply = await client.stop(name, timeout=1, command_id=command_id)
            else:
                reply = await client.start(name, command_id=command_id)
        except SandboxError as exc:
            self.answers[str(exc.code)] += 1
            if exc.code == "outcome_unknown":
                self.unknown.append((name, command_id))
            return
        self.answers["accepted"] += 1
        if reply.appended:
            self.acknowledged.append((reply.sandbox, reply.seq, command_id))


async def churn(client: SandboxClient, ledger: Ledger, names: list[str], seconds: float) -> None:
    """Stops and starts, one sandbox after another, for ``seconds``: what users do while the machine fails."""
    deadline = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < deadline:
        name = names[turn % len(names)]
        await ledger.send(client, "stop" if turn // len(names) % 2 == 0 else "start", name)
        turn += 1
        await asyncio.sleep(0.2)


async def ready(client: SandboxClient, ledger: Ledger, up: Up, name: str, timeout: float = 120.0) -> None:
    """Bring the sandbox to Ready after the churn: wait out a stop or start under way, start it
    from Stopped or Error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    phase = "unknown"
    while loop.time() < deadline:
        phase = (await client.get(name))["phase"]
        if phase == "Ready":
            return
        if phase in ("Stopped", "Error"):
            await ledger.send(client, "start", name)
        await asyncio.sleep(1)
    history = [(e.get("seq"), e.get("type"), e.get("phase"), e.get("reason")) for e in await client.history(name)]
    raise AssertionError(
        f"{name} did not come back to Ready within {timeout:g}s: still {phase}; its history {history[-12:]}; "
        f"answers {dict(ledger.answers)}; up said:\n" + "\n".join(up.lines[-60:])
    )


def engine_phase(name: str) -> str:
    found = podman("container", "inspect", f"sandboxctl-{name}", check=False)
    if found.returncode != 0:
        return "missing"
    state = json.loads(found.stdout)[0]["State"]
    return "Ready" if state["Running"] else "Stopped"


async def converged(client: SandboxClient, names: list[str], timeout: float) -> dict[str, tuple[str, str]]:
    """Wait until every sandbox's phase is the engine's (Ready: running, Stopped: exited); returns the
    last (phase, engine) of each that does not agree."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        apart: dict[str, tuple[str, str]] = {}
        for name in names:
            try:
                phase = (await client.get(name))["phase"]
            except SandboxError as exc:
                phase = f"unknown ({exc.code})"
            engine = await asyncio.to_thread(engine_phase, name)
            if phase != engine:
                apart[name] = (phase, engine)
        if not apart or loop.time() > deadline:
            return apart
        await asyncio.sleep(1)


async def healthy(env: dict[str, str], timeout: float) -> list[dict[str, object]]:
    """``sandboxctl status`` until it exits 0 (every service up, none behind); its last report."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, out, err = await cli_process(env, "status", "-o", "json")
        report = json.loads(out) if out.strip().startswith("[") else []
        if code == 0 or loop.time() > deadline:
            assert code == 0, f"status {code}: {err}\n{out}"
            return report
        await asyncio.sleep(1)


async def test_a_full_disk_a_frozen_server_and_a_frozen_engine_lose_nothing_and_every_phase_follows_the_engine(
    tmp_path: Path, small_disk: Path, image: str, sandboxes: list[str]
) -> None:
    port = free_port()
    env = up_env(tmp_path, port, own_podman=True)
    assert Path(env["SANDBOXCTL_DATA_DIR"]) == small_disk
    up = await Up(env, port).start()
    client: SandboxClient | None = None
    began = time.monotonic()
    faults: list[str] = []
    try:
        await up.up()
        client = await up.client()
        names = [f"hm{port}-{i}" for i in range(SANDBOXES)]
        sandboxes += names
        replies = [await client.create(name, image, command=SLEEPER) for name in names]
        for name, reply in zip(names, replies, strict=True):
            await client.wait_for(name, "Ready", reply.seq, timeout=120)
        ledger = Ledger()
        client.request_timeout, client.retries = 4.0, 1  # a user who does not wait long, and retries once

        # 1. The data directory's filesystem fills up while commands come, then space comes back.
        filler = fill(small_disk)
        faults.append("disk full 20 s")
        await churn(client, ledger, names[:3], 20)
        filler.unlink()
        await healthy(env, 180)

        # 2. nats-server frozen for 15 s while commands come.
        server = up.pid_of("nats-server")
        os.kill(server, signal.SIGSTOP)
        faults.append("nats-server frozen 15 s")
        try:
            await churn(client, ledger, names[3:], 15)
        finally:
            with contextlib.suppress(ProcessLookupError):  # up may have replaced a server that stopped answering
                os.kill(server, signal.SIGCONT)
        await healthy(env, 120)

        # 3. The engine's API service frozen for 20 s in the middle of stops.
        engine = up.pid_of("podman")
        for name in names:
            await ready(client, ledger, up, name)
        for name in names[:4]:
            await ledger.send(client, "stop", name)
        os.kill(engine, signal.SIGSTOP)
        faults.append("podman service frozen 20 s during 4 stops")
        try:
            await asyncio.sleep(20)
        finally:
            with contextlib.suppress(ProcessLookupError):  # likewise the engine's service
                os.kill(engine, signal.SIGCONT)
        ended = time.monotonic()

        # Every phase equals the engine's within 60 s of the last fault's end.
        client.request_timeout, client.retries = 10.0, 3
        apart = await converged(client, names, CONVERGE)
        settled = time.monotonic() - ended
        if apart:
            failed = [e for e in await client.history(next(iter(apart))) if e["phase"] == "Error"]
            tail = "\n".join(up.lines[-40:])
            raise AssertionError(
                f"phases that do not follow the engine {CONVERGE:g}s after the faults: {apart}; "
                f"the first failure: {failed[:1]}; up said:\n{tail}"
            )

        # No acknowledged event lost: each accepted command's events are in the log where its reply said.
        js = client.nc.jetstream()
        for name, seq, command_id in ledger.acknowledged:
            stored = await js.get_msg(subjects.LOG_STREAM, seq)
            assert stored.subject == subjects.log(name), (name, seq, command_id)
            assert json.loads(stored.data or b"{}")["causationid"] == command_id, (name, seq, command_id)
        history = {name: await client.history(name) for name in names}
        landed = sum(
            any(e.get("causationid") == command_id for e in history[name]) for name, command_id in ledger.unknown
        )

        # Every service alive, or restarted by its supervisor.
        report = await healthy(env, 30)
        restarts = {str(r["component"]): r["restarts"] for r in report if r.get("restarts")}
        assert up.proc is not None and up.proc.returncode is None, up.text
        print(
            f"\nhostile machine: {len(names)} sandboxes on podman; faults: {'; '.join(faults)}; "
            f"{sum(ledger.answers.values())} commands during the faults, answered "
            f"{dict(sorted(ledger.answers.items()))}; "
            f"{len(ledger.acknowledged)} acknowledged appends, 0 lost; {len(ledger.unknown)} with outcome unknown, "
            f"{landed} of them in the log; every phase equal to the engine {settled:.1f}s after the last fault "
            f"(bound {CONVERGE:g}s); restarts {restarts or 'none'}; {time.monotonic() - began:.0f}s in all"
        )
        await client.close()
        client = None
        assert await up.stop() == 0, up.text
    finally:
        if client is not None:
            await client.close()
        await up.kill()
