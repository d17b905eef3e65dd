"""The command line's own cost: a ``sandboxctl`` call against the same work done without it.

Pairs timed side by side in one run, alternating call by call so that the machine's noise falls
on every side alike:

- ``sandboxctl get NAME -o json`` against a bare nats-py script, run by the same interpreter,
  that connects, sends the same query and prints the same JSON (the least any Python client of
  sandboxctl costs in a process of its own);
- ``sandboxctl stop X && sandboxctl start X`` against ``podman stop Y && podman start Y`` on an
  identical container (same image, network none, a named volume at /workspace): each sandboxctl
  call waits for its phase (Stopped, Ready) to be in the log and projected, each podman call for
  its engine;
- each sandboxctl call both ways: handed to the fork server ``serve`` runs (cli/fast.py, as a
  user's call is whenever ``up`` or ``serve`` runs on the host), and in an interpreter of its
  own from its imports on (``SANDBOXCTL_FAST=0``, as without one);
- and, as the floor of any Python client in a process of its own, a bare nats-py script that
  sends the same stop and start and waits for the projector's notice of each phase: against
  podman's CLI (what Python, asyncio and nats-py cost before any of sandboxctl's code) and
  against sandboxctl's own-interpreter pair (what sandboxctl's code adds to that floor).

Every call is a new process, as a user's is, with the control plane running in another
(``sandboxctl serve``). Bytecode is compiled before the first timed call, as an installed
package has it. Each side's every wall time is kept, for the distributions on the page.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import IMAGE, ROOT, config, engines, nats, parser, percentiles, save, workdir
from bench.engine_latency import create_raw, delete_sandbox, remove_raw, sdk_client, serve, serve_env
from sandboxctl.cli.fast import FAST_ENV
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config

GET_TARGET = 1.3  # sandboxctl get, at most this many times the bare script's wall time (p50)
PAIR_TARGET = 1.8  # sandboxctl stop && start, at most this many times podman's CLI (p50)
NAME = "cli-bench"
RAW = "cli-bench-raw"

# What a Python program that knows the subject and the wire format, and nothing of sandboxctl,
# runs to ask for one sandbox: connect, one request, the result printed as JSON.
BARE_GET = """
import asyncio, json, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    msg = await nc.request(sys.argv[2], json.dumps({"name": sys.argv[3], "at_least": 0}).encode(), timeout=5)
    print(json.dumps(json.loads(msg.data)["result"], indent=2))
    await nc.close()

asyncio.run(main())
"""

# The same for a stop or a start and its wait: the command sent, then the projector's notice of
# the phase at or after the command's position. What any Python client of sandboxctl pays at
# least for one call of the pair: the interpreter, asyncio and nats-py, and the control plane.
BARE_PHASE = """
import asyncio, json, sys, uuid
import nats

async def main():
    url, subject, notices, name, verb, phase = sys.argv[1:7]
    nc = await nats.connect(url)
    seen = asyncio.Queue()

    async def noticed(msg):
        seen.put_nowait(json.loads(msg.data))

    await nc.subscribe(notices, cb=noticed)
    command = {"type": f"sandboxctl.command.{verb}.v1", "name": name, "command_id": uuid.uuid4().hex}
    reply = json.loads((await nc.request(subject, json.dumps(command).encode(), timeout=10)).data)
    assert reply.get("accepted"), reply
    while True:
        notice = await asyncio.wait_for(seen.get(), 60)
        if notice["phase"] == phase and notice["seq"] >= reply["seq"]:
            break
    print(f"sandbox {name} {phase}")
    await nc.close()

asyncio.run(main())
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """One call's wall time, in seconds; a call that fails stops the benchmark with its output."""
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return took


def timed_pair(first: list[str], second: list[str], env: dict[str, str]) -> float:
    return timed(first, env) + timed(second, env)


def figures(ours: list[float], baseline: list[float], target: float) -> dict[str, Any]:
    mine, base = percentiles(ours, keep=True), percentiles(baseline, keep=True)
    ratio = mine["p50_ms"] / base["p50_ms"]
    return {
        "sandboxctl": mine,
        "baseline": base,
        "ratio_p50": ratio,
        "target_ratio": target,
        "target_met": ratio <= target,
    }


async def ready(cfg: Config) -> None:
    client = await SandboxClient.connect(cfg.nats_url, actor="bench")
    try:
        reply = await client.create(NAME, IMAGE)
        await client.wait_for(NAME, "Ready", reply.seq, timeout=60)
    finally:
        await client.close()


async def deleted(cfg: Config) -> None:
    client = await SandboxClient.connect(cfg.nats_url, actor="bench")
    try:
        await delete_sandbox(client, NAME)
    finally:
        await client.close()


def measure(cfg: Config, root: Path, rounds: int) -> dict[str, Any]:
    env = serve_env(cfg)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "sandboxctl")], check=True, env=env)
    sandboxctl = str(Path(sys.executable).with_name("sandboxctl"))
    podman = shutil.which("podman") or "podman"
    bare = [sys.executable, "-c", BARE_GET, cfg.nats_url, subjects.query("get"), NAME]
    get = [sandboxctl, "get", NAME, "-o", "json"]
    ours_pair = ([sandboxctl, "stop", NAME], [sandboxctl, "start", NAME])
    podman_pair = ([podman, "stop", "--time", "10", RAW], [podman, "start", RAW])
    bare_phase = [sys.executable, "-c", BARE_PHASE, cfg.nats_url]
    bare_pair = (
        [*bare_phase, subjects.command("stop"), subjects.projected(NAME), NAME, "stop", "Stopped"],
        [*bare_phase, subjects.command("start"), subjects.projected(NAME), NAME, "start", "Ready"],
    )
    # Each sandboxctl call handed to serve's fork server (and failing if it cannot be), or run
    # in its own interpreter from its imports on (cli/fast.py).
    fast, here = {**env, FAST_ENV: "require"}, {**env, FAST_ENV: "0"}
    calls = {"get": (get, fast), "get_here": (get, here), "bare": (bare, env)}
    pairs = {
        "pair": (ours_pair, fast),
        "pair_here": (ours_pair, here),
        "podman": (podman_pair, env),
        "bare_pair": (bare_pair, env),
    }

    asyncio.run(ready(cfg))
    engine = sdk_client("podman", cfg.podman_url)
    create_raw(engine, RAW)
    try:
        same = json.loads(subprocess.run(bare, env=env, capture_output=True, text=True, check=True).stdout)
        assert same["name"] == NAME, same  # both sides answer the same question
        for _ in range(2):  # warm: bytecode, the page cache, podman's own first calls
            for cmd, side_env in calls.values():
                timed(cmd, side_env)
            for pair, side_env in pairs.values():
                timed_pair(*pair, side_env)
        sides: dict[str, list[float]] = {side: [] for side in (*calls, *pairs)}
        for i in range(rounds):
            # Each side first in turn, so that none always follows another's caches.
            order = list(calls)
            for side in order[i % len(order) :] + order[: i % len(order)]:
                sides[side].append(timed(*calls[side]))
            order = list(pairs)
            for side in order[i % len(order) :] + order[: i % len(order)]:
                pair, side_env = pairs[side]
                sides[side].append(timed_pair(*pair, side_env))
    finally:
        remove_raw(engine, RAW)
        engine.close()
        asyncio.run(deleted(cfg))
    imports = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sandboxctl.cli.main"],
        env=env,
        capture_output=True,
        text=True,
    ).stderr.splitlines()
    return {
        "get": figures(sides["get"], sides["bare"], GET_TARGET),
        "stop_start": figures(sides["pair"], sides["podman"], PAIR_TARGET),
        # The same calls, each in an interpreter of its own (SANDBOXCTL_FAST=0).
        "get_here": figures(sides["get_here"], sides["bare"], GET_TARGET),
        "stop_start_here": figures(sides["pair_here"], sides["podman"], PAIR_TARGET),
        # The floor of any Python client in a process of its own: a bare nats-py script's pair
        # against podman's CLI, and sandboxctl's own-interpreter pair against that script's.
        "bare_stop_start": figures(sides["bare_pair"], sides["podman"], PAIR_TARGET),
        "stop_start_over_bare": figures(sides["pair_here"], sides["bare_pair"], GET_TARGET),
        "rounds": rounds,
        "cli_import_ms": int(imports[-1].split("|")[1]) / 1000 if imports else None,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=30, help="timed calls per side (default 30)")
    args = p.parse_args()
    rounds = 2 if args.quick else args.rounds
    # An installed package runs from its bytecode; and the fork server takes only the calls whose
    # PYTHON* settings are its own, so serve and the calls share this environment.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    with workdir() as root, nats(root) as server, engines(root, ("podman",)) as urls:
        cfg = config(root, server.url, urls, ("podman",))
        with serve(cfg, root):
            results = measure(cfg, root, rounds)
    save(
        "cli",
        {
            "title": "The command line against a bare script and podman's CLI",
            "summary": (
                "Wall time of whole calls, each a new process: sandboxctl get against a bare nats-py "
                "script asking the same query, and sandboxctl stop && start against podman stop && start "
                "on an identical container. Each sandboxctl call is measured handed to the fork server "
                "that serve runs (as a call is whenever up or serve runs on the host) and in an "
                "interpreter of its own (SANDBOXCTL_FAST=0). A bare nats-py script doing the same stop && "
                "start (the command, then the projector's notice of the phase) is the floor of any Python "
                "client in a process of its own: its ratio to podman's CLI is what the interpreter, "
                "asyncio and nats-py cost per call before sandboxctl's own code."
            ),
            "results": results,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
