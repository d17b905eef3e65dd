"""Memory: resident memory of the state-machine service holding 100,000 sandboxes.

The log is filled directly, as fast as JetStream takes it: for each sandbox a
``SandboxCreated`` and a ``SandboxReady`` event in the product's envelope, on
the product's log stream, published with ``js.publish_async``. Going through
commands would measure throughput, not memory, and would take minutes.

Then a fresh ``StateMachineService`` starts in a process of its own and folds
the whole log, as it does after every restart. Its resident memory (VmRSS) is
read after a ``gc.collect()`` before ``start()`` (modules imported, NATS
connected) and again once its state holds every sandbox; the difference over
the number of sandboxes is the figure the target bounds.

Baseline, in the same run: a process that holds the same fields for as many
sandboxes as a plain ``dict`` of tuples, the least a Python cache of this data
can cost. Strings are as long as the real ones: a 32-hex sandbox id and an
engine start time as the incarnation.

Usage: ``python -m bench.memory [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time
from typing import Any

from bench.common import nats as nats_server
from bench.common import parser, save, workdir
from bench.throughput import Child, say, until_told_to_stop
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, encode, now, type_name
from sandboxctl.events.lifecycle import SandboxCreated, SandboxReady

TARGET_BYTES_PER_SANDBOX = 1024
SOURCE = "sandboxctl/statemachine"

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    """This process's resident set, from /proc/self/status (psutil is not installed)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


def sandbox(i: int) -> tuple[str, str, str]:
    """Name, sandbox id and incarnation of sandbox ``i``, as long as real ones."""
    return f"mem-{i:06d}", f"{i:032x}", f"2025-01-01 00:00:00.{i:09d} +0000 UTC"


# -- filling the log -----------------------------------------------------------------


def events_of(i: int) -> list[Envelope]:
    name, sandbox_id, incarnation = sandbox(i)
    created = SandboxCreated(sandbox_id=sandbox_id, image="localhost/sandboxctl-busybox:latest", driver="fake")
    ready = SandboxReady(incarnation=incarnation)
    return [
        Envelope(
            id=f"{sandbox_id}:{index}",
            type=type_name(type(event)),
            source=SOURCE,
            subject=name,
            time=now(),
            data=event,
            actor="bench",
            correlationid=sandbox_id,
            causationid=sandbox_id,
        )
        for index, event in enumerate((created, ready))
    ]


async def fill_log(url: str, sandboxes: int) -> dict[str, Any]:
    import nats

    from sandboxctl.bus.streams import ensure_streams

    nc = await nats.connect(url, name="bench-fill")
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        await ensure_streams(js)
        futures = []
        start = time.perf_counter()
        for i in range(sandboxes):
            for envelope in events_of(i):
                futures.append(
                    await js.publish_async(
                        subjects.log(envelope.subject), encode(envelope), headers={"Nats-Msg-Id": envelope.id}
                    )
                )
        await js.publish_async_completed()
        elapsed = time.perf_counter() - start
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} appends failed, e.g. {failed[0]!r}")
        stored = (await js.stream_info(subjects.LOG_STREAM)).state.messages
        if stored != 2 * sandboxes:
            raise RuntimeError(f"log holds {stored} events, expected {2 * sandboxes}")
        return {"events": stored, "fill_s": elapsed, "fill_events_per_s": stored / elapsed}
    finally:
        await nc.close()


# -- the processes measured ------------------------------------------------------------


async def serve_statemachine(url: str, expect: int) -> None:
    import nats

    from sandboxctl.services.statemachine import StateMachineService

    nc = await nats.connect(url, name="bench-statemachine")
    service = StateMachineService(nc, drivers=("fake",), default_driver="fake")
    before = settled_rss()
    start = time.perf_counter()
    await service.start()
    fold_s = time.perf_counter() - start
    held = len(service.states)
    after = settled_rss()
    say(ready=True, before=before, after=after, sandboxes=held, fold_s=fold_s, position=service.position)
    try:
        await until_told_to_stop()
    finally:
        await service.stop()
        await nc.close()
    if held != expect:
        log.error("state holds %d sandboxes, expected %d", held, expect)


async def serve_plain_dict(expect: int) -> None:
    """The floor: the same per-sandbox fields in a dict of tuples, nothing else."""
    before = settled_rss()
    table: dict[str, tuple[str, str, str, str, int, str, str]] = {}
    for i in range(expect):
        name, sandbox_id, incarnation = sandbox(i)
        table[name] = (name, sandbox_id, "Ready", "fake", 2 * i + 2, incarnation, "")
    after = settled_rss()
    say(ready=True, before=before, after=after, sandboxes=len(table))
    await until_told_to_stop()


# -- the benchmark ------------------------------------------------------------------------


async def held_by(role: str, *args: str) -> dict[str, Any]:
    child, report = await Child.start("bench.memory", role, *args, timeout=600)
    await child.stop()
    return report


async def measure(sandboxes: int) -> dict[str, Any]:
    with workdir() as root, nats_server(root) as server:
        fill = await fill_log(server.url, sandboxes)
        service = await held_by("statemachine", "--nats-url", server.url, "--expect", str(sandboxes))
    plain = await held_by("plain", "--expect", str(sandboxes))
    if service["sandboxes"] != sandboxes:
        raise RuntimeError(f"state machine holds {service['sandboxes']} sandboxes, expected {sandboxes}")
    per_sandbox = (service["after"] - service["before"]) / sandboxes
    plain_per_sandbox = (plain["after"] - plain["before"]) / sandboxes
    return {
        "sandboxes": sandboxes,
        "baseline_rss_mib": service["before"] / 2**20,
        "rss_mib": service["after"] / 2**20,
        "bytes_per_sandbox": per_sandbox,
        "plain_dict_bytes_per_sandbox": plain_per_sandbox,
        "ratio_to_plain_dict": per_sandbox / plain_per_sandbox if plain_per_sandbox > 0 else None,
        "fold_s": service["fold_s"],
        "fold_events_per_s": fill["events"] / service["fold_s"],
        **fill,
        "target_bytes_per_sandbox": TARGET_BYTES_PER_SANDBOX,
        "target_met": per_sandbox <= TARGET_BYTES_PER_SANDBOX,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--sandboxes", type=int, default=100_000)
    p.add_argument("--serve", choices=("statemachine", "plain"), help=argparse.SUPPRESS)
    p.add_argument("--nats-url", help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.serve == "statemachine":
        asyncio.run(serve_statemachine(args.nats_url, args.expect))
        return
    if args.serve == "plain":
        asyncio.run(serve_plain_dict(args.expect))
        return
    sandboxes = 1_000 if args.quick else args.sandboxes
    result = asyncio.run(measure(sandboxes))
    save(
        "memory",
        {
            "title": "Memory per sandbox",
            "summary": (
                f"Resident memory a state-machine process gains by folding a log of {sandboxes:,} Ready sandboxes "
                f"(2 events each), per sandbox; against a plain dict of tuples with the same fields. "
                f"Target: at most {TARGET_BYTES_PER_SANDBOX:,} bytes per sandbox above the baseline."
            ),
            "notes": (
                "VmRSS after gc.collect(), before start() and once the state holds every sandbox, in a process "
                "of its own. RSS also counts allocator arenas freed but not returned to the OS, so this is an "
                "upper bound on what the state itself holds."
            ),
            **result,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
