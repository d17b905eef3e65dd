"""The plots on docs/benchmarks.md, drawn with matplotlib from the saved results (PNG, committed
in docs/benchmarks/ next to the page).

- ``engine_latency``: per engine and operation, the distribution of sandboxctl's whole operation
  against the raw engine call of the same run, as empirical CDFs (a curve that rises later is
  slower; the gap at 0.5 is the time added at p50);
- ``cli``: each command line call's wall time against its baseline's, the same way;
- ``throughput``: commands per second through sandboxctl against the bare round and against raw
  publishes, and the CPU each costs per command.

A plot is drawn only from figures a run measured: a result without samples (from before they
were kept) gets no distribution, and the page says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, SAMPLES

PLOTS = ROOT / "docs" / "benchmarks"
OURS, BASE = "#1f77b4", "#7f7f7f"  # sandboxctl's colour, and its baseline's, on every plot


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a CI machine
    import matplotlib.pyplot as plt

    return plt


def _ecdf(ax: Any, samples: Sequence[float], label: str, colour: str) -> None:
    ordered = sorted(samples)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})", color=colour)


def _samples(figure: Any) -> list[float]:
    values = figure.get(SAMPLES) if isinstance(figure, dict) else None
    return [float(v) for v in values] if isinstance(values, list) else []


def _grid(plt: Any, panels: list[tuple[str, list[float], str, list[float]]], title: str) -> Any:
    """One ECDF panel per (title, ours, baseline label, baseline), two to a row."""
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.4 * rows), squeeze=False)
    for ax, (name, ours, base_label, base) in zip(axes.flat, panels, strict=False):
        _ecdf(ax, base, base_label, BASE)
        _ecdf(ax, ours, "sandboxctl", OURS)
        ax.axhline(0.5, color="#cccccc", linewidth=0.8, zorder=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of calls")
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def engine_latency(result: dict[str, Any]) -> Any:
    plt = _pyplot()
    panels = []
    for engine, ops in (result.get("results") or {}).items():
        for verb, figures in ops.items():
            raw_key = "raw_sdk_call" if "raw_sdk_call" in figures else "raw_call"
            ours, base = _samples(figures.get("sandboxctl")), _samples(figures.get(raw_key))
            if ours and base:
                panels.append((f"{engine} {verb}", ours, "raw engine call", base))
    if not panels:
        return None
    return _grid(plt, panels, "Stop, start and create: sandboxctl against the raw engine call, same run")


def cli(result: dict[str, Any]) -> Any:
    plt = _pyplot()
    results = result.get("results") or {}
    panels = []
    for key, name, base_label in (
        ("get", "sandboxctl get NAME", "bare nats-py script"),
        ("stop_start", "sandboxctl stop && start", "podman stop && start"),
        ("get_here", "sandboxctl get NAME, in its own interpreter", "bare nats-py script"),
        ("stop_start_here", "sandboxctl stop && start, in its own interpreter", "podman stop && start"),
    ):
        figures = results.get(key) or {}
        ours, base = _samples(figures.get("sandboxctl")), _samples(figures.get("baseline"))
        if ours and base:
            panels.append((name, ours, base_label, base))
    if not panels:
        return None
    return _grid(plt, panels, "Whole command line calls, each a new process, same run")


def throughput(result: dict[str, Any]) -> Any:
    rates = [
        ("sandboxctl", result.get("commands_per_s")),
        ("bare round", result.get("bare_round_commands_per_s")),
        ("raw publish", result.get("raw_msgs_per_s")),
    ]
    cpu = [
        ("sandboxctl", result.get("cpu_us_per_command_all_processes")),
        ("bare round", result.get("bare_round_cpu_us_per_command_all_processes")),
    ]
    if not all(isinstance(v, int | float) for _, v in rates + cpu):
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    colours = [OURS, BASE, "#bbbbbb"]
    left.bar_label(left.bar([k for k, _ in rates], [v for _, v in rates], color=colours), fmt="{:,.0f}")
    left.set_ylabel("per second")
    left.set_title("stop/start commands (raw: messages published)", fontsize=10)
    right.bar_label(right.bar([k for k, _ in cpu], [v for _, v in cpu], color=colours[:2]), fmt="{:,.0f}")
    right.set_ylabel("µs of CPU, all processes")
    right.set_title("CPU per command", fontsize=10)
    fig.suptitle("Command throughput against the bare round, same run")
    fig.tight_layout()
    return fig


DRAWERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "engine_latency": engine_latency,
    "cli": cli,
    "throughput": throughput,
}


def draw(results_dir: Path = RESULTS, out: Path = PLOTS) -> dict[str, Path]:
    """Draw every plot its result allows, into ``out``; returns each drawn plot's file by benchmark.
    A plot whose result has nothing to draw is removed, so the page never shows a stale one."""
    drawn: dict[str, Path] = {}
    for name, drawer in DRAWERS.items():
        path = out / f"{name}.png"
        try:
            result = json.loads((results_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            result = None
        fig = drawer(result) if isinstance(result, dict) else None
        if fig is None:
            path.unlink(missing_ok=True)
            continue
        out.mkdir(parents=True, exist_ok=True)
        # No timestamp in the file: the same figures give the same bytes, and no needless diff.
        fig.savefig(path, dpi=90, metadata={"Software": None})
        _pyplot().close(fig)
        drawn[name] = path
    return drawn
