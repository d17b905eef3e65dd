"""Command throughput: accepted commands per second through the state-machine service.

Everything is real except the engine: a nats-server with file storage, the
state-machine service, the driver worker, the projector and the query service.
The driver worker drives ``FakeDriver``, which answers at once, so the figures
are the control plane's alone.

Layout. The state-machine service runs alone in a process of its own, so that
"one state-machine process" is exactly what the target names, and its CPU time
per accepted command can be read from /proc without the load generator's or
the other services' share. The rest of the plane (driver worker, projector,
query service) runs in a second process. The load generator is this process.
``sandboxctl serve`` puts every service in one process; the sum of the two
processes' CPU per command is what that process would spend.

Load. 1,000 sandboxes are created first. Then each sandbox is driven through
stop/start cycles, all sandboxes at once: a command is sent as a plain NATS
request with a pre-encoded payload, and the next one for the same sandbox only
once the projection says the previous one's phase was reached (Stopped after a
stop, Ready after a start). That is the only order in which every command fits
its phase, so every reply must be accepted and append one event; anything else
is counted and fails the run. Each accepted command therefore costs the whole
round: decide and guarded append, work order, fact, the reaction's append and
the projection.

Baselines, in the same run:

- ``js.publish_async`` of as many ~300-byte messages, each with a
  ``Nats-Msg-Id``, to a file-backed stream, on the same server: one leg of the
  round, the one the issue names.
- The bare round (bench/bare_round.py): the same legs, processes and transport
  with none of sandboxctl's own work, driven by the same load generator on a
  server of its own. What it reaches is what the round's shape allows on this
  machine; sandboxctl against it is the cost of sandboxctl's code.

Usage: ``python -m bench.throughput [--quick]``. The ``--serve ROLE`` form is
the benchmark starting its own parts; it is not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from bench.common import ROOT, cpu_seconds, parser, percentiles, save, workdir
from bench.common import nats as nats_server
from sandboxctl.events import subjects
from sandboxctl.events.commands import CreateSandbox, StartSandbox, StopSandbox
from sandboxctl.events.envelope import Envelope, encode, now, type_name
from sandboxctl.events.lifecycle import SandboxStopRequested
from sandboxctl.events.replies import Reply, reply_decoder

TARGET_COMMANDS_PER_S = 10_000
RAW_STREAM = "BENCH_RAW"
_CLK_TCK = os.sysconf("SC_CLK_TCK")

log = logging.getLogger(__name__)


# -- processes of our own ----------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its threads (psutil is not installed)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def say(**fields: Any) -> None:
    """A child's one channel to the benchmark: a JSON line on stdout."""
    print(json.dumps(fields), flush=True)


async def until_told_to_stop() -> None:
    """A child runs until the benchmark writes a line, or closes its stdin by dying."""
    await asyncio.to_thread(sys.stdin.readline)


class Child:
    """One part of a benchmark in a process of its own.

    It is ``python -m <module> --serve <role> ...``; it reports on stdout as
    JSON lines, the first one once it is ready, and stops cleanly when a line
    arrives on its stdin. Its CPU time is read from /proc, never estimated.
    """

    def __init__(self, role: str, proc: asyncio.subprocess.Process) -> None:
        self.role = role
        self.proc = proc

    @classmethod
    async def start(cls, module: str, role: str, *args: str, timeout: float = 120.0) -> tuple[Child, dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "--serve",
            role,
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = cls(role, proc)
        try:
            ready = await child.read(timeout)
        except BaseException:
            await child.stop()
            raise
        return child, ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    async def read(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"bench part {self.role!r} exited with code {await self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    async def stop(self, timeout: float = 30.0) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.proc.stdin.write(b"stop\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.warning("bench part %s did not stop in %ss; killing pid %d", self.role, timeout, self.proc.pid)
            self.proc.kill()
            await self.proc.wait()


# -- the parts under test ------------------------------------------------------------


async def _connect(url: str, name: str) -> NATS:
    return await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2)


async def serve_until_told(connections: list[NATS], stop: Callable[[], Awaitable[None]]) -> None:
    """A started part's life: report ready, run until the benchmark says stop, then stop it
    and close its connections."""
    say(ready=True, pid=os.getpid())
    try:
        await until_told_to_stop()
    finally:
        await stop()
        for nc in connections:
            await nc.close()


async def serve_statemachine(url: str) -> None:
    from sandboxctl.services.statemachine import StateMachineService

    nc = await _connect(url, "bench-statemachine")
    service = StateMachineService(nc, drivers=("fake",), default_driver="fake")
    await service.start()
    await serve_until_told([nc], service.stop)


async def serve_plane(url: str, data_dir: Path) -> None:
    """Everything but the state machine: the driver worker on FakeDriver, the projector and the query service."""
    from bench.fake_driver import FakeDriver
    from sandboxctl.services.projector import Projector
    from sandboxctl.services.query import QueryService
    from sandboxctl.services.worker import DriverWorker

    db = data_dir / "projection.sqlite3"
    connections = [await _connect(url, f"bench-{part}") for part in ("projector", "query", "driver-fake")]
    driver = FakeDriver()
    projector = Projector(connections[0], db)
    await projector.start()
    query = QueryService(connections[1], db)
    await query.start()
    worker = DriverWorker(connections[2], driver)
    await worker.start()

    async def stop() -> None:
        await worker.stop()
        driver.close()
        await query.stop()
        await projector.stop()

    await serve_until_told(connections, stop)


async def serve_bare_statemachine(url: str) -> None:
    from bench.bare_round import BareStateMachine

    nc = await _connect(url, "bench-bare-statemachine")
    service = BareStateMachine(nc)
    await service.start()
    await serve_until_told([nc], service.stop)


async def serve_bare_plane(url: str) -> None:
    from bench.bare_round import BarePlane

    connections = [await _connect(url, f"bench-bare-{part}") for part in ("worker", "projector")]
    plane = BarePlane(*connections)
    await plane.start()
    await serve_until_told(connections, plane.stop)


# -- the load generator ----------------------------------------------------------------


class Notice(msgspec.Struct):
    name: str
    phase: str
    seq: int


_notice_decoder = msgspec.json.Decoder(Notice)
_TARGET_PHASE = {"create": "Ready", "stop": "Stopped", "start": "Ready"}


class Load:
    """Drives sandboxes with commands that always fit their phase.

    It learns phases from the projector's ``sandboxctl.projected.<name>``
    notices, which cost the load generator a subscription and the plane
    nothing it does not do anyway.
    """

    def __init__(self, nc: NATS, settle_timeout: float = 60.0) -> None:
        self.nc = nc
        self.settle_timeout = settle_timeout
        self.seen: dict[str, tuple[str, int]] = {}
        self.waiting: dict[str, tuple[str, int, asyncio.Future[None]]] = {}
        self.accepted = 0
        self.noops = 0
        self.rejected: list[str] = []
        self.latencies: list[float] = []

    async def watch(self) -> None:
        await self.nc.subscribe(subjects.projected("*"), cb=self._on_projected, pending_msgs_limit=1_000_000)

    async def _on_projected(self, msg: Msg) -> None:
        notice = _notice_decoder.decode(msg.data)
        self.seen[notice.name] = (notice.phase, notice.seq)
        waiter = self.waiting.get(notice.name)
        if waiter is not None and notice.phase == waiter[0] and notice.seq > waiter[1] and not waiter[2].done():
            waiter[2].set_result(None)

    async def settle(self, name: str, phase: str, after_seq: int) -> None:
        seen = self.seen.get(name)
        if seen is not None and seen[0] == phase and seen[1] > after_seq:
            return
        future = asyncio.get_running_loop().create_future()
        self.waiting[name] = (phase, after_seq, future)
        try:
            await asyncio.wait_for(future, self.settle_timeout)
        except TimeoutError:
            raise RuntimeError(
                f"{name} did not reach {phase} after seq {after_seq} in {self.settle_timeout}s; "
                f"last notice {self.seen.get(name)}"
            ) from None
        finally:
            del self.waiting[name]

    async def run_sandbox(self, name: str, commands: list[tuple[str, bytes]]) -> None:
        """Send one sandbox's commands in order, each once the previous one has landed."""
        for verb, payload in commands:
            start = time.perf_counter()
            msg = await self.nc.request(subjects.command(verb), payload, timeout=60)
            self.latencies.append(time.perf_counter() - start)
            reply: Reply = reply_decoder.decode(msg.data)
            if not reply.accepted:
                error = reply.error
                self.rejected.append(f"{name} {verb}: {error.code if error else '?'}: {error.message if error else ''}")
                return
            self.accepted += 1
            if reply.appended != 1:
                self.noops += 1
            await self.settle(name, _TARGET_PHASE[verb], reply.seq)

    async def run(self, plan: dict[str, list[tuple[str, bytes]]]) -> None:
        await asyncio.gather(*(self.run_sandbox(name, commands) for name, commands in plan.items()))

    def reset(self) -> None:
        self.accepted = self.noops = 0
        self.rejected.clear()
        self.latencies.clear()


def sandbox_names(count: int) -> list[str]:
    return [f"tp-{i:05d}" for i in range(count)]


def create_plan(names: list[str]) -> dict[str, list[tuple[str, bytes]]]:
    def create(name: str) -> bytes:
        return encode(CreateSandbox(name=name, image="bench", driver="fake", command_id=f"c-{name}", actor="bench"))

    return {name: [("create", create(name))] for name in names}


def cycle_plan(names: list[str], commands: int) -> dict[str, list[tuple[str, bytes]]]:
    """stop, start, stop, ... per sandbox; ``commands`` in all, spread evenly.

    Every payload is encoded here, before the clock starts, each with a
    command id of its own (a repeated id would be deduplicated by the log).
    """
    per, extra = divmod(commands, len(names))
    plan: dict[str, list[tuple[str, bytes]]] = {}
    for index, name in enumerate(names):
        items: list[tuple[str, bytes]] = []
        for k in range(per + (1 if index < extra else 0)):
            command_id = f"{name}-{k}"
            if k % 2 == 0:
                items.append(("stop", encode(StopSandbox(name=name, command_id=command_id, actor="bench"))))
            else:
                items.append(("start", encode(StartSandbox(name=name, command_id=command_id, actor="bench"))))
        plan[name] = items
    return plan


def sample_event_payload() -> bytes:
    """An event as the state machine appends it, so the raw baseline moves the same bytes."""
    event = SandboxStopRequested(sandbox_id="0123456789abcdef0123456789abcdef", driver="fake")
    return encode(
        Envelope(
            id="tp-00000-0:0",
            type=type_name(SandboxStopRequested),
            source="sandboxctl/statemachine",
            subject="tp-00000",
            time=now(),
            data=event,
            actor="bench",
            correlationid="tp-00000-0",
            causationid="tp-00000-0",
        )
    )


async def raw_publish(url: str, server_pid: int, count: int, names: list[str]) -> dict[str, Any]:
    """The baseline: ``js.publish_async`` of ``count`` messages with Nats-Msg-Id, to a file stream."""
    nc = await _connect(url, "bench-raw")
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        await js.add_stream(
            StreamConfig(
                name=RAW_STREAM,
                subjects=["bench.raw.*"],
                storage=StorageType.FILE,
                duplicate_window=120.0,
            )
        )
        payload = sample_event_payload()
        targets = [f"bench.raw.{name}" for name in names]
        futures = []
        cpu0, server0, start = cpu_seconds(), process_cpu_seconds(server_pid), time.perf_counter()
        for i in range(count):
            futures.append(
                await js.publish_async(targets[i % len(targets)], payload, headers={"Nats-Msg-Id": f"raw-{i}"})
            )
        await js.publish_async_completed()
        elapsed = time.perf_counter() - start
        cpu, server = cpu_seconds() - cpu0, process_cpu_seconds(server_pid) - server0
        failed = sum(1 for f in futures if f.exception() is not None)
        stored = (await js.stream_info(RAW_STREAM)).state.messages
        if failed or stored != count:
            raise RuntimeError(f"raw publish: {failed} failed, {stored} of {count} stored")
        return {
            "msgs": count,
            "payload_bytes": len(payload),
            "elapsed_s": elapsed,
            "msgs_per_s": count / elapsed,
            "publisher_cpu_us_per_msg": cpu / count * 1e6,
            "nats_server_cpu_us_per_msg": server / count * 1e6,
        }
    finally:
        await nc.close()


async def drive(
    url: str, server_pid: int, names: list[str], commands: int, roles: tuple[str, str], data_dir: Path
) -> dict[str, Any]:
    """Start a state machine and the rest of a plane as ``roles``, create the sandboxes, then
    time ``commands`` stop/start commands across them, with the CPU each process spent."""
    async with contextlib.AsyncExitStack() as stack:
        sm, _ = await Child.start("bench.throughput", roles[0], "--nats-url", url)
        stack.push_async_callback(sm.stop)
        plane, _ = await Child.start("bench.throughput", roles[1], "--nats-url", url, "--data-dir", str(data_dir))
        stack.push_async_callback(plane.stop)
        nc = await _connect(url, "bench-load")
        stack.push_async_callback(nc.close)
        load = Load(nc)
        await load.watch()

        start = time.perf_counter()
        await load.run(create_plan(names))
        create_s = time.perf_counter() - start
        if load.rejected or load.accepted != len(names):
            raise RuntimeError(f"creating sandboxes: {load.rejected[:5]}")
        load.reset()

        plan = cycle_plan(names, commands)
        before = (sm.cpu_seconds(), plane.cpu_seconds(), process_cpu_seconds(server_pid), cpu_seconds())
        start = time.perf_counter()
        await load.run(plan)
        elapsed = time.perf_counter() - start
        after = (sm.cpu_seconds(), plane.cpu_seconds(), process_cpu_seconds(server_pid), cpu_seconds())
    if load.rejected or load.noops:
        raise RuntimeError(f"{len(load.rejected)} rejected, {load.noops} no-ops: {load.rejected[:5]}")
    sm_cpu, plane_cpu, server_cpu, load_cpu = (b - a for a, b in zip(before, after, strict=True))
    accepted = load.accepted
    return {
        "commands_accepted": accepted,
        "create_s": create_s,
        "elapsed_s": elapsed,
        "commands_per_s": accepted / elapsed,
        "cpu_us_per_command_by_process": {
            "statemachine": sm_cpu / accepted * 1e6,
            "rest_of_plane": plane_cpu / accepted * 1e6,
            "nats_server": server_cpu / accepted * 1e6,
            "load_generator": load_cpu / accepted * 1e6,
        },
        "statemachine_cpu_busy": sm_cpu / elapsed,
        "command_reply_latency": percentiles(load.latencies),
    }


async def measure(sandboxes: int, commands: int) -> dict[str, Any]:
    names = sandbox_names(sandboxes)
    with workdir() as root, nats_server(root) as server:
        assert server.proc is not None
        raw = await raw_publish(server.url, server.proc.pid, commands, names)
        real = await drive(server.url, server.proc.pid, names, commands, ("statemachine", "plane"), root / "data")
    # The bare round on a server of its own, so neither run's streams weigh on the other.
    with workdir() as root, nats_server(root) as server:
        assert server.proc is not None
        bare = await drive(
            server.url, server.proc.pid, names, commands, ("bare-statemachine", "bare-plane"), root / "data"
        )

    per_command = real["cpu_us_per_command_by_process"]
    rate = real["commands_per_s"]
    whole = sum(per_command.values())
    bare_whole = sum(bare["cpu_us_per_command_by_process"].values())
    return {
        "sandboxes": sandboxes,
        "commands_sent": commands,
        **real,
        "raw_msgs_per_s": raw["msgs_per_s"],
        "ratio_to_raw": rate / raw["msgs_per_s"],
        "bare_round_commands_per_s": bare["commands_per_s"],
        "ratio_to_bare_round": rate / bare["commands_per_s"],
        "cpu_us_per_command": per_command["statemachine"],
        "cpu_us_per_command_all_processes": whole,
        "bare_round_cpu_us_per_command_all_processes": bare_whole,
        "statemachine_cpu_bound_commands_per_s": 1e6 / per_command["statemachine"],
        "one_process_cpu_bound_commands_per_s": 1e6 / (per_command["statemachine"] + per_command["rest_of_plane"]),
        "machine_cpu_bound_commands_per_s": (os.cpu_count() or 1) * 1e6 / whole,
        "raw": raw,
        "bare_round": bare,
        "target_commands_per_s": TARGET_COMMANDS_PER_S,
        "target_met": rate >= TARGET_COMMANDS_PER_S,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--sandboxes", type=int, default=1000)
    p.add_argument("--commands", type=int, default=20_000)
    p.add_argument(
        "--serve", choices=("statemachine", "plane", "bare-statemachine", "bare-plane"), help=argparse.SUPPRESS
    )
    p.add_argument("--nats-url", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.serve == "statemachine":
        asyncio.run(serve_statemachine(args.nats_url))
        return
    if args.serve == "plane":
        asyncio.run(serve_plane(args.nats_url, args.data_dir))
        return
    if args.serve == "bare-statemachine":
        asyncio.run(serve_bare_statemachine(args.nats_url))
        return
    if args.serve == "bare-plane":
        asyncio.run(serve_bare_plane(args.nats_url))
        return
    sandboxes, commands = (50, 200) if args.quick else (args.sandboxes, args.commands)
    result = asyncio.run(measure(sandboxes, commands))
    save(
        "throughput",
        {
            "title": "Command throughput",
            "summary": (
                f"Accepted stop/start commands per second through one state-machine process, "
                f"{sandboxes:,} sandboxes at once, FakeDriver, nats-server with file storage; "
                f"against js.publish_async of as many messages and against the bare round "
                f"(the same messages with none of sandboxctl's work), in the same run. "
                f"Target: at least {TARGET_COMMANDS_PER_S:,}/s."
            ),
            "notes": (
                "Each command is sent once the previous one for its sandbox has landed in the projection, so every "
                "command is accepted and costs a full round (append, work order, fact, reaction, projection). "
                "The state machine runs alone in one process, the driver worker, projector and query service in "
                "another, the load generator in a third; CPU is read from /proc per process. The bare round "
                "(bench/bare_round.py) runs the same legs over the same transport, in the same processes, with no "
                "envelope, decide, evolve, SQLite or engine thread. A 2-core machine shared with other work: "
                "rates are noisy, CPU per command less so."
            ),
            **result,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
