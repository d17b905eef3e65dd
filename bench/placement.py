"""Placement: what choosing a host costs a create, at 10, 100 and 1,000 hosts announced.

The hosts are simulated announcements (testing/hosts.py's, written straight into the hosts'
bucket): no driver worker runs, so the figure is the control plane's alone, and a machine of
two cores can hold a fleet's worth of hosts. Each case runs its own nats-server and one state
machine that places; the load generator (this process) sends CREATES creates one after
another and times each from request to reply. The baseline, in the same run, is the same
creates against a state machine that places nothing (its sandboxes are on no host).

Beside it, in process: the placement itself, per create (the host chosen and the create
folded), by the index the state machine uses (statemachine/placement.py, ``Placer``) and by the
scan over every host it replaced, at each fleet size.

Usage: ``python -m bench.placement [--quick]``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats

from bench.common import nats as nats_server
from bench.common import parser, percentiles, save, workdir
from sandboxctl.bus.hosts import hosts_bucket
from sandboxctl.client import SandboxClient
from sandboxctl.events.hosts import HostAnnouncement, encode_host
from sandboxctl.events.spec import Resources
from sandboxctl.services.statemachine import StateMachineService
from sandboxctl.statemachine import Phase, SandboxState
from sandboxctl.statemachine.placement import Candidate, Loads, Placer, place
from testing.hosts import SIMULATED_HEARTBEAT

FLEETS = (10, 100, 1000)
CREATES = 600
IN_PROCESS = 5000  # placements timed in process per fleet size
NONE = Resources()


async def _announce(url: str, count: int) -> None:
    nc = await nats.connect(url)
    try:
        kv = await hosts_bucket(nc.jetstream())
        for i in range(count):
            host = HostAnnouncement(
                name=f"sim-{i}",
                worker=f"simulated-{i}",
                engines=["podman"],
                cpus=64.0,
                memory=256 << 30,
                max_sandboxes=100_000,
                heartbeat=SIMULATED_HEARTBEAT,
            )
            await kv.put(host.name, encode_host(host))
    finally:
        await nc.close()


async def _creates(root: Path, hosts: int, creates: int) -> dict[str, Any]:
    """Creates timed against a state machine that places among ``hosts`` hosts (0: places nothing)."""
    with nats_server(root) as server:
        if hosts:
            await _announce(server.url, hosts)
        machine = StateMachineService(await nats.connect(server.url), drivers=("podman",), place=bool(hosts))
        await machine.start()
        client = await SandboxClient.connect(server.url, actor="bench")
        try:
            while machine.hosts is not None and len(machine.hosts.hosts) < hosts:  # noqa: ASYNC110 (its view fills as it reads)
                await asyncio.sleep(0.05)
            samples, chosen = [], set()
            for i in range(creates):
                began = time.perf_counter()
                reply = await client.create(f"p-{i}", "localhost/img:latest", driver="podman")
                samples.append(time.perf_counter() - began)
                assert reply.accepted, reply
                chosen.add(machine.states[f"p-{i}"].host)
            return {"latency": percentiles(samples), "hosts_used": len(chosen)}
        finally:
            await client.close()
            await machine.stop()
            await machine.nc.close()


def _in_process(hosts: int, count: int) -> dict[str, float]:
    """Microseconds per placement and fold, by the index and by the scan."""
    candidates = [
        Candidate(name=f"sim-{i}", engines=("podman",), labels={}, max_sandboxes=100_000, cpus=64.0, memory=256 << 30)
        for i in range(hosts)
    ]
    placer = Placer(live=lambda _name: True)
    for candidate in candidates:
        placer.announce(candidate.name, candidate)
    scanned = Loads()
    figures: dict[str, float] = {}
    for way in ("index", "scan"):
        began = time.perf_counter()
        for i in range(count):
            if way == "index":
                where, loads = placer.place("podman", NONE), placer.loads
            else:
                where, loads = place(candidates, scanned, "podman", NONE), scanned
            assert isinstance(where, str)
            loads.changed(
                None, SandboxState(name=f"s{i}", sandbox_id=f"s{i}", phase=Phase.READY, driver="podman", host=where)
            )
        figures[f"{way}_us"] = (time.perf_counter() - began) / count * 1e6
    return figures


async def run(quick: bool) -> dict[str, Any]:
    fleets = (10, 100) if quick else FLEETS
    creates = 30 if quick else CREATES
    cases: dict[str, Any] = {}
    with workdir() as root:
        baseline = await _creates(root / "baseline", 0, creates)
        for hosts in fleets:
            case = await _creates(root / f"hosts-{hosts}", hosts, creates)
            case.update(_in_process(hosts, 200 if quick else IN_PROCESS))
            case["added_p50_ms"] = case["latency"]["p50_ms"] - baseline["latency"]["p50_ms"]
            case["ratio_p50_to_baseline"] = case["latency"]["p50_ms"] / baseline["latency"]["p50_ms"]
            cases[str(hosts)] = case
    smallest, largest = cases[str(fleets[0])], cases[str(fleets[-1])]
    return {
        "hosts_simulated": True,
        "creates_per_case": creates,
        "baseline": baseline,
        "cases": cases,
        "index_growth_largest_to_smallest": largest["index_us"] / smallest["index_us"],
        "create_p50_growth_largest_to_smallest": largest["latency"]["p50_ms"] / smallest["latency"]["p50_ms"],
    }


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    save("placement", asyncio.run(run(args.quick)), args.quick)


if __name__ == "__main__":
    main()
