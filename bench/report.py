"""Renders docs/benchmarks.md from the saved results of the last full runs.

The page is generated so that every figure on it is one that a benchmark
measured, next to the raw baseline measured in the same run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT

ORDER = ("engine_latency", "throughput", "bulk_stop", "replay", "memory", "lag", "durability")
COMMANDS = {name: f"python -m bench.{name}" for name in ORDER}
INTRO = """# Benchmarks

sandboxctl sits between its users and a container engine; these benchmarks
measure what it adds on top of the engine and of JetStream. Every figure is
measured next to its raw baseline **in the same run**, and reported as a ratio
to it. They are benchmarks, not timed tests: CI runs each only in `--quick`
mode (tests/test_bench.py), which checks that it works and measures nothing.

Run one: `.venv/bin/python -m bench.<name>`; run all and regenerate this page:
`.venv/bin/python -m bench.run_all`. Results land in `bench/results/*.json`.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{prefix}[{i}]", v, out)
    else:
        out.append((prefix, _fmt(value)))


def section(name: str, result: dict[str, Any]) -> str:
    lines = [f"## {result.get('title', name)}", ""]
    if result.get("summary"):
        lines += [str(result["summary"]), ""]
    lines += [f"Command: `{COMMANDS.get(name, name)}` · measured {result.get('when', '?')}", ""]
    if result.get("notes"):
        lines += [str(result["notes"]), ""]
    rows: list[tuple[str, str]] = []
    skip = {"benchmark", "when", "machine", "title", "summary", "notes"}
    _flatten("", {k: v for k, v in result.items() if k not in skip}, rows)
    lines += ["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    return "\n".join(lines)


def render(results_dir: Path = RESULTS) -> str:
    found = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    parts = [INTRO]
    if found:
        machine = next(iter(found.values())).get("machine", {})
        parts.append("Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + "\n")
    for name in (*ORDER, *sorted(set(found) - set(ORDER))):
        if name in found:
            parts.append(section(name, found[name]))
        else:
            parts.append(f"## {name}\n\nNot measured yet: run `{COMMANDS.get(name, name)}`.\n")
    extra = ROOT / "docs" / "benchmarks-analysis.md"
    if extra.exists():
        parts.append(extra.read_text())
    return "\n".join(parts)


def main() -> None:
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text(render())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
