"""The command line's own cost: a ``sandboxctl`` call against the same work done without it.

Two pairs, timed side by side in one run, alternating call by call so that the machine's
noise falls on both sides alike:

- ``sandboxctl get NAME -o json`` against a bare nats-py script, run by the same interpreter,
  that connects, sends the same query and prints the same JSON (the least any Python client of
  sandboxctl can cost);
- ``sandboxctl stop X && sandboxctl start X`` against ``podman stop Y && podman start Y`` on an
  identical container (same image, network none, a named volume at /workspace): each sandboxctl
  call waits for its phase (Stopped, Ready) to be in the log and projected, each podman call for
  its engine.

Every call is a new process, as a user's is, with the control plane running in another
(``sandboxctl serve``). Bytecode is compiled before the first timed call, as an installed
package has it. Each side's every wall time is kept, for the distributions on the page.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import IMAGE, ROOT, config, engines, nats, parser, percentiles, save, workdir
from bench.engine_latency import create_raw, delete_sandbox, remove_raw, sdk_client, serve, serve_env
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
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package runs from its bytecode
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "sandboxctl")], check=True, env=env)
    sandboxctl = str(Path(sys.executable).with_name("sandboxctl"))
    podman = shutil.which("podman") or "podman"
    bare = [sys.executable, "-c", BARE_GET, cfg.nats_url, subjects.query("get"), NAME]
    get = [sandboxctl, "get", NAME, "-o", "json"]
    ours_pair = ([sandboxctl, "stop", NAME], [sandboxctl, "start", NAME])
    podman_pair = ([podman, "stop", "--time", "10", RAW], [podman, "start", RAW])

    asyncio.run(ready(cfg))
    engine = sdk_client("podman", cfg.podman_url)
    create_raw(engine, RAW)
    try:
        same = json.loads(subprocess.run(bare, env=env, capture_output=True, text=True, check=True).stdout)
        assert same["name"] == NAME, same  # both sides answer the same question
        for _ in range(2):  # warm: bytecode, the page cache, podman's own first calls
            timed(get, env), timed(bare, env), timed_pair(*ours_pair, env), timed_pair(*podman_pair, env)
        sides: dict[str, list[float]] = {"get": [], "bare": [], "pair": [], "podman": []}
        for i in range(rounds):
            # Alternate which side goes first, so neither always follows the other's caches.
            for side in ("get", "bare") if i % 2 == 0 else ("bare", "get"):
                sides[side].append(timed(get if side == "get" else bare, env))
            for side in ("pair", "podman") if i % 2 == 0 else ("podman", "pair"):
                sides[side].append(timed_pair(*(ours_pair if side == "pair" else podman_pair), env))
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
        "rounds": rounds,
        "cli_import_ms": int(imports[-1].split("|")[1]) / 1000 if imports else None,
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=30, help="timed calls per side (default 30)")
    args = p.parse_args()
    rounds = 2 if args.quick else args.rounds
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
                "on an identical container."
            ),
            "results": results,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
