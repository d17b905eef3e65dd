"""End-to-end stop and start latency per engine, next to the raw SDK call.

The issue: the time from StopSandbox published to the Stopped phase readable
from the query service (and StartSandbox to Ready), for podman and docker,
compared with the SDK's own ``container.stop()`` / ``container.start()`` on an
identical container (same image, ``--network none``, a named volume at
/workspace). p50 and p99 over at least 30 cycles. Target: at p50 the control
plane adds at most 15 ms over the raw call.

Why the control plane runs in a process of its own (``sandboxctl serve``):
that is how users get it (``sandboxctl up`` is one process, every CLI call
another), and in one process the measuring client would share an event loop
and the GIL with the services. Its clock would then include queueing behind
the services' work, and the raw SDK calls, which block, would stall the
services between samples. Both sides still share the machine's two cores with
nats-server and the engines, as they do in use.

Cycles alternate which side goes first, so neither always runs on a machine
the other has just warmed or loaded, and pause briefly between operations so
the engine watcher's late copy of one operation (podman's event backend lags
by up to 250 ms) does not land inside the next measurement. One untimed cycle
warms connections and caches first.

Besides the headline figures the benchmark splits each sandboxctl operation
into hops, from timestamps the system records anyway: the envelope ``time``
of the request event, the fact and the phase event (stamped by the process
that made them), JetStream's stored timestamp of each, and the arrival of the
``sandboxctl.projected`` notice at this client. All processes read the same
host clock. The raw side is also timed as the driver does it
(``containers.get``, the call, ``reload``), so the driver's extra engine calls
are not mistaken for control-plane cost.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from docker import DockerClient
from nats.js import JetStreamContext
from podman import PodmanClient

from bench.common import IMAGE, ROOT, code_version, config, engines, nats, parser, percentiles, save, workdir
from sandboxctl.bus.eventlog import decode_event, decode_fact
from sandboxctl.bus.tail import Tail
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope
from sandboxctl.runtime.config import Config

ENGINES = ("podman", "docker")
TARGET_ADDED_P50_MS = 15.0
SETTLE_S = 0.3  # between operations; longer than podman's event lag
RAW_LABEL = {"sandboxctl.bench": "raw"}  # not sandboxctl.managed: the control plane must not see these


# -- the control plane in a process of its own ------------------------------------


def serve_env(cfg: Config) -> dict[str, str]:
    """The environment ``sandboxctl serve`` and the CLI read their configuration from."""
    return {
        **os.environ,
        "SANDBOXCTL_NATS_URL": cfg.nats_url,
        "SANDBOXCTL_DATA_DIR": str(cfg.data_dir),
        "SANDBOXCTL_RUN_DIR": str(cfg.run_dir),
        "SANDBOXCTL_PODMAN_URL": cfg.podman_url,
        "SANDBOXCTL_DOCKER_URL": cfg.docker_url,
        "SANDBOXCTL_DRIVERS": ",".join(cfg.drivers),
        "SANDBOXCTL_DEFAULT_DRIVER": cfg.default_driver,
        "SANDBOXCTL_ACTOR": "bench",
    }


@contextmanager
def serve(cfg: Config, root: Path, timeout: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m sandboxctl.cli serve`` until the block ends; stopped with SIGTERM as Ctrl-C would."""
    log_path = root / "serve.log"
    with open(log_path, "wb") as logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxctl.cli", "serve"],
            cwd=ROOT,
            env=serve_env(cfg),
            stdout=logfile,
            stderr=logfile,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while b"services are up" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"sandboxctl serve did not come up (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- raw containers, made the way the drivers make sandboxes ------------------------


def sdk_client(engine: str, url: str) -> Any:
    if engine == "podman":
        return PodmanClient(base_url=url, timeout=60, max_pool_size=64)
    return DockerClient(base_url=url, version="auto", timeout=60, max_pool_size=64)


def create_raw(client: Any, name: str) -> Any:
    """A container like a sandbox's: same image, network none, a named volume at /workspace."""
    volume = f"{name}-workspace"
    client.volumes.create(name=volume, labels=RAW_LABEL)
    container = client.containers.create(
        IMAGE,
        name=name,
        labels=RAW_LABEL,
        volumes={volume: {"bind": "/workspace", "mode": "rw"}},
        network_mode="none",
        hostname=name,
    )
    container.start()
    return container


def remove_raw(client: Any, name: str) -> None:
    for remove in (
        lambda: client.containers.get(name).remove(force=True),
        lambda: client.volumes.get(f"{name}-workspace").remove(force=True),
    ):
        try:
            remove()
        except Exception as exc:  # already gone, or the engine is going away: nothing left to keep
            print(f"cleanup of {name}: {exc}", file=sys.stderr)


def raw_op(client: Any, name: str, verb: str) -> tuple[float, float]:
    """The SDK call alone, and the sequence the driver makes (get, call, reload), in seconds.

    Called on the event loop's thread on purpose: a raw caller has no thread hand-off."""
    t0 = time.perf_counter()
    container = client.containers.get(name)
    t1 = time.perf_counter()
    if verb == "stop":
        container.stop(timeout=10)
    else:
        container.start()
    t2 = time.perf_counter()
    container.reload()
    t3 = time.perf_counter()
    return t2 - t1, t3 - t0


# -- reading what the system recorded ------------------------------------------------


async def read_stream(
    js: JetStreamContext, stream: str, subject: str, decode: Callable[[bytes], Envelope], start_seq: int = 1
) -> list[tuple[int, float, Envelope]]:
    """(stream seq, stored time, envelope) of every message on ``subject``, in order."""
    tail = Tail(js, stream, subject, start_seq, idle_timeout=0.5)
    end = await tail.last_seq()
    out: list[tuple[int, float, Envelope]] = []
    try:
        async for batch in tail.batches():
            for msg in batch:
                out.append((msg.metadata.sequence.stream, msg.metadata.timestamp.timestamp(), decode(msg.data)))
            if not batch or tail.next_seq > end:
                break
    finally:
        await tail.close()
    return out


class Notices:
    """Arrival time at this client of each ``sandboxctl.projected`` notice, by (name, seq)."""

    def __init__(self) -> None:
        self.arrived: dict[tuple[str, int], float] = {}

    async def record(self, msg: Any) -> None:
        at = time.time()
        notice = msgspec.json.decode(msg.data)
        self.arrived.setdefault((notice["name"], int(notice["seq"])), at)


def hops(
    sample: dict[str, Any], log: list[tuple[int, float, Envelope]], facts: dict[str, Any], notices: Notices
) -> Any:
    """Split one sandboxctl operation's time into hops, in ms; None if a record is missing."""
    done_type = "stopped" if sample["verb"] == "stop" else "ready"
    by_seq = {seq: (stored, env) for seq, stored, env in log}
    if sample["seq"] not in by_seq:
        return None
    req_stored, req = by_seq[sample["seq"]]
    done = next(
        ((seq, stored, env) for seq, stored, env in log if seq > sample["seq"] and f".{done_type}." in env.type), None
    )
    if done is None or done[2].causationid not in facts:
        return None
    done_seq, done_stored, done_env = done
    fact_stored, fact = facts[done_env.causationid]
    notice = notices.arrived.get((sample["name"], done_seq))
    if notice is None:
        return None
    t0, t_end = sample["t0"], sample["t0"] + sample["total"]
    marks = [
        ("client_to_request_decided", req.time.timestamp()),
        ("request_append", req_stored),
        ("worker_pickup_and_driver_call", fact.time.timestamp()),
        ("fact_publish", fact_stored),
        ("facts_consumer_to_phase_decided", done_env.time.timestamp()),
        ("phase_append", done_stored),
        ("projector_to_notice_at_client", notice),
        ("notice_to_wait_for_return", t_end),
    ]
    out: dict[str, Any] = {}
    previous = t0
    for label, mark in marks:
        out[label] = (mark - previous) * 1000
        previous = mark
    out["reply_at_client"] = (sample["t_reply"] - t0) * 1000
    out["fact_by_watcher"] = fact.causationid != req.id
    return out


# -- the measurement ------------------------------------------------------------------


async def sandboxctl_op(client: SandboxClient, name: str, verb: str) -> dict[str, Any]:
    t0_wall = time.time()
    t0 = time.perf_counter()
    reply = await (client.stop(name) if verb == "stop" else client.start(name))
    t_reply = time.perf_counter()
    await client.wait_for(name, "Stopped" if verb == "stop" else "Ready", reply.seq, timeout=60)
    total = time.perf_counter() - t0
    return {
        "name": name,
        "verb": verb,
        "seq": reply.seq,
        "t0": t0_wall,
        "t_reply": t0_wall + t_reply - t0,
        "total": total,
    }


async def measure_engine(client: SandboxClient, engine: str, url: str, cycles: int, tag: str) -> dict[str, Any]:
    sdk = sdk_client(engine, url)
    name, raw = f"lat-{engine}-{tag}", f"bench-raw-lat-{engine}-{tag}"
    notices = Notices()
    sub = await client.nc.subscribe(subjects.projected(name), cb=notices.record)
    try:
        reply = await client.create(name, IMAGE, driver=engine)
        await client.wait_for(name, "Ready", reply.seq, timeout=120)
        create_raw(sdk, raw)
        ops: dict[str, dict[str, list[Any]]] = {
            verb: {"sandboxctl": [], "raw_call": [], "raw_driver_sequence": []} for verb in ("stop", "start")
        }
        for cycle in range(cycles + 1):  # cycle 0 warms up and is not kept
            for verb in ("stop", "start"):
                pair = []
                for side in ("sandboxctl", "raw") if cycle % 2 == 0 else ("raw", "sandboxctl"):
                    await asyncio.sleep(SETTLE_S)
                    if side == "sandboxctl":
                        pair.append(("sandboxctl", await sandboxctl_op(client, name, verb)))
                    else:
                        pair.append(("raw", raw_op(sdk, raw, verb)))
                if cycle == 0:
                    continue
                for side, value in pair:
                    if side == "sandboxctl":
                        ops[verb]["sandboxctl"].append(value)
                    else:
                        ops[verb]["raw_call"].append(value[0])
                        ops[verb]["raw_driver_sequence"].append(value[1])
        await asyncio.sleep(1.0)  # let the last notices arrive
        log = await read_stream(client.nc.jetstream(), subjects.LOG_STREAM, subjects.log(name), decode_event)
        facts = {
            env.id: (stored, env)
            for _, stored, env in await read_stream(
                client.nc.jetstream(), subjects.FACTS_STREAM, subjects.fact(name), decode_fact
            )
        }
        return {verb: summarize(ops[verb], log, facts, notices) for verb in ("stop", "start")}
    finally:
        await sub.unsubscribe()
        try:
            reply = await client.delete(name)
            await client.wait_for(name, "Deleted", reply.seq, timeout=60)
        except Exception as exc:
            print(f"could not delete sandbox {name}: {exc}", file=sys.stderr)
        remove_raw(sdk, raw)
        sdk.close()


def summarize(
    op: dict[str, list[Any]], log: list[tuple[int, float, Envelope]], facts: dict[str, Any], notices: Notices
) -> dict[str, Any]:
    ours = percentiles([s["total"] for s in op["sandboxctl"]])
    raw = percentiles(op["raw_call"])
    driver_seq = percentiles(op["raw_driver_sequence"])
    split = [h for h in (hops(s, log, facts, notices) for s in op["sandboxctl"]) if h is not None]
    hop_p50: dict[str, float] = {}
    if split:
        for key in split[0]:
            if key != "fact_by_watcher":
                hop_p50[key] = percentiles([h[key] / 1000 for h in split])["p50_ms"]
    added_p50 = ours["p50_ms"] - raw["p50_ms"]
    return {
        "sandboxctl": ours,
        "raw_sdk_call": raw,
        "raw_driver_sequence": driver_seq,
        "added_p50_ms": added_p50,
        "added_p99_ms": ours["p99_ms"] - raw["p99_ms"],
        "ratio_p50": ours["p50_ms"] / raw["p50_ms"],
        "ratio_p99": ours["p99_ms"] / raw["p99_ms"],
        "added_over_driver_sequence_p50_ms": ours["p50_ms"] - driver_seq["p50_ms"],
        "target_met": added_p50 <= TARGET_ADDED_P50_MS,
        "hops_p50_ms": hop_p50,
        "hops_split": len(split),
        "fact_from_watcher": sum(1 for h in split if h["fact_by_watcher"]),
    }


async def run(cfg: Config, urls: dict[str, str], cycles: int) -> dict[str, Any]:
    client = await SandboxClient.connect(cfg.nats_url, actor="bench")
    tag = uuid.uuid4().hex[:6]  # podman's storage is shared with whoever else runs on this machine
    try:
        return {engine: await measure_engine(client, engine, urls[engine], cycles, tag) for engine in ENGINES}
    finally:
        await client.close()


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--cycles", type=int, default=40, help="stop/start cycles per engine (default 40; --quick: 3)")
    args = p.parse_args()
    cycles = 3 if args.quick else args.cycles
    load_before = os.getloadavg()
    version = code_version()  # taken first: the product may be edited while this runs
    with workdir() as root, nats(root) as server, engines(root, ENGINES) as urls:
        cfg = config(root, server.url, urls, ENGINES)
        with serve(cfg, root):
            results = asyncio.run(run(cfg, urls, cycles))
    targets = {
        f"{engine}.{verb}": results[engine][verb]["target_met"] for engine in ENGINES for verb in results[engine]
    }
    save(
        "engine_latency",
        {
            "title": "Stop and start latency per engine",
            "summary": (
                "Time from a stop (start) command sent to Stopped (Ready) readable from the query service, "
                "against the raw SDK call on an identical container, alternating, same engines, same run. "
                f"Target: at most {TARGET_ADDED_P50_MS:g} ms added at p50."
            ),
            "notes": (
                "Control plane in its own process (sandboxctl serve); the client measures from this one. "
                "raw_driver_sequence is get + call + reload, the engine calls the driver makes. "
                "hops_p50_ms splits sandboxctl's time by the envelope and JetStream timestamps. "
                "2-core machine shared with other work: figures are noisy (see load average)."
            ),
            "cycles": cycles,
            "code": version,
            "control_plane": "subprocess: python -m sandboxctl.cli serve",
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "results": results,
            "target_added_p50_ms": TARGET_ADDED_P50_MS,
            "target_met": targets,
            "all_targets_met": all(targets.values()),
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
