"""What every benchmark shares: real parts to run against, timing, and results.

Each benchmark is a module with ``main()`` that measures sandboxctl and the raw
baseline in the same run and calls ``save`` with its figures; ``bench.report``
turns the saved results into docs/benchmarks.md. ``--quick`` shrinks every size
so the suite's smoke test can run each benchmark in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import NatsServer, PodmanService
from testing.dockerd import DockerDaemon

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("SANDBOXCTL_BENCH_RESULTS", ROOT / "bench" / "results"))
IMAGE = os.environ.get("SANDBOXCTL_TEST_IMAGE", "localhost/sandboxctl-busybox:latest")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs, measures nothing")
    return p


SAMPLES = "samples_ms"  # a figure's every sample, in milliseconds as measured: the plots draw them


def percentiles(samples: Sequence[float], keep: bool = False) -> dict[str, Any]:
    """p50/p99/mean of samples in seconds, reported in milliseconds; with ``keep``, the samples
    too (in the order measured, to 0.001 ms), for the distributions on the page."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * (len(ordered) - 1))))]
    out: dict[str, Any] = {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": p99 * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }
    if keep:
        out[SAMPLES] = [round(s * 1000, 3) for s in samples]
    return out


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def save(name: str, result: dict[str, Any], quick: bool) -> Path:
    """Write one benchmark's figures; quick runs go elsewhere so they never reach the docs."""
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "code": code_version(),  # a benchmark that edits nothing measures this; one may name its own
        **result,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(json.dumps(result, indent=2))
    return path


def machine() -> dict[str, Any]:
    def version(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "n/a"

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "podman": version("podman", "--version"),
        "dockerd": version("dockerd", "--version"),
    }


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sandboxctl-bench-") as d:
        yield Path(d)


@contextlib.contextmanager
def nats(root: Path) -> Iterator[NatsServer]:
    server = NatsServer(root / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def engines(root: Path, which: Sequence[str] = ("podman", "docker")) -> Iterator[dict[str, str]]:
    """Engine URLs, each with the test image in it, started for this run (vm has no URL: the image
    goes into podman's storage, from which the vm driver makes its disks)."""
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if "podman" in which:
            podman = PodmanService(root / "podman.sock").start()
            stack.callback(podman.stop)
            urls["podman"] = podman.url
        if "docker" in which:
            daemon = DockerDaemon(root / "docker").start()
            stack.callback(daemon.stop)
            urls["docker"] = daemon.url
        # The vm driver makes a VM's root disk from the image in podman's storage (podman export).
        env = {**os.environ, "SKIP_PODMAN": "" if "podman" in which or "vm" in which else "1"}
        if "docker" in which:
            env["DOCKER_HOST"] = urls["docker"]
        subprocess.run(["bash", str(ROOT / "scripts" / "build-test-image.sh")], check=True, env=env)
        yield urls


def config(root: Path, nats_url: str, urls: dict[str, str], drivers: Sequence[str] | None = None) -> Config:
    drivers = tuple(drivers or urls)
    return Config(
        nats_url=nats_url,
        data_dir=root / "data",
        run_dir=root / "run",
        podman_url=urls.get("podman", ""),
        docker_url=urls.get("docker", ""),
        drivers=drivers,
        default_driver=drivers[0],
        actor="bench",
    )


@contextlib.asynccontextmanager
async def timer() -> AsyncIterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


# The folders the product is made of: every subpackage of sandboxctl (pyproject.toml).
PRODUCT = (
    "sandboxctl",
    "events",
    "statemachine",
    "observe",
    "bus",
    "client",
    "auth",
    "drivers",
    "services",
    "audit",
    "runtime",
    "cli",
)


def code_version() -> dict[str, Any]:
    """Which product code was measured: the git HEAD and a hash of the product's sources.

    The product is edited while benchmarks run, so a result names the exact
    sources it measured; the hash also identifies a snapshot outside git."""
    digest = hashlib.sha256()
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", *PRODUCT],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "git_head": git.stdout.strip() or "n/a",
        "product_modified": [line[3:] for line in dirty.stdout.splitlines()] if git.returncode == 0 else "n/a",
        "product_sha256": digest.hexdigest()[:16],
    }
