"""Renders docs/benchmarks.md from the saved results of the last full runs.

The page is generated so that every figure on it is one that a benchmark
measured, next to the raw baseline measured in the same run.

Each benchmark gets one table first: per case, what was measured, sandboxctl's
figure, the baseline from the same run, the ratio (or, for latency, the time
added), the target and whether it was met. A ``Layout`` below says which keys
of a result fill that table; its ``rows`` reads the result as the benchmark
saved it (bench/<name>.py). Under the table: the code, machine and load the
figures were measured on, the command that reproduces them, a link to the raw
JSON and, collapsed, every figure of the result flattened. A benchmark with no
layout, or a result whose shape its layout does not fit, still renders: its
flattened figures become the table.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Results from before their benchmark recorded its target: the target it has now.
from bench.bulk_stop import TARGET_RATIO as BULK_STOP_TARGET_RATIO
from bench.common import RESULTS, ROOT, SAMPLES
from bench.engine_latency import TARGET_ADDED_P50_MS

ORDER = (
    "engine_latency",
    "cli",
    "throughput",
    "bulk_stop",
    "replay",
    "memory",
    "lag",
    "durability",
    "cluster",
    "placement",
)
INTRO = """# Benchmarks

sandboxctl sits between its users and a container engine; these benchmarks
measure what it adds on top of the engine and of JetStream. Every figure is
measured next to its raw baseline **in the same run**, and reported as a ratio
to it. They are benchmarks, not timed tests: CI runs each only in `--quick`
mode (tests/e2e/test_bench.py), which checks that it works and measures nothing.

Run one: `.venv/bin/python -m bench.<name>`; run all and regenerate this page:
`.venv/bin/python -m bench.run_all`. Results land in `bench/results/*.json`.
"""
DOCS = ROOT / "docs"
PROSE = ("benchmark", "title", "summary", "notes")  # shown as text, left out of the flattened figures
NONE = "—"
TIMES = "\N{MULTIPLICATION SIGN}"


def command(name: str) -> str:
    """The command that measures one benchmark again."""
    return f"python -m bench.{name}"


COMMANDS = {name: command(name) for name in ORDER}


# -- figures as text ------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) if value else "none"
    return str(value)


def _ms(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value / 1000:,.2f} s"
    return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.1f} ms"


def _added_ms(value: float) -> str:
    return f"{value:+.2f} ms" if abs(value) < 1 else f"{value:+.1f} ms"


def _ratio(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value:.2f}{TIMES}" if abs(value) >= 0.1 else f"{value:.3f}{TIMES}"


def _rate(value: float, unit: str = "/s") -> str:
    return f"{value:,.0f}{unit}"


def _us(value: float) -> str:
    return f"{value:,.0f} µs"


def _bytes(value: float) -> str:
    return f"{value:,.0f} B"


def _met(value: bool | None) -> str:
    if value is None:
        return NONE
    return "yes" if value else "**no**"


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k.endswith(SAMPLES):  # the plot shows them; the table gives how many (n)
                continue
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{prefix}[{i}]", v, out)
    else:
        out.append((prefix, _fmt(value)))


def flattened(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Every figure of a result as (dotted key, value), in the order saved."""
    rows: list[tuple[str, str]] = []
    _flatten("", {k: v for k, v in result.items() if k not in PROSE}, rows)
    return rows


# -- one table per benchmark ----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One case: sandboxctl's figure against the baseline of the same run."""

    measured: str
    ours: str
    baseline: str
    versus: str
    target: str = NONE
    met: bool | None = None


@dataclass(frozen=True)
class Layout:
    """How one benchmark's result becomes its table; the headers name the two sides."""

    title: str  # the heading while the benchmark has no result
    rows: Callable[[dict[str, Any]], list[Row]]
    ours: str = "sandboxctl"
    baseline: str = "baseline, same run"
    versus: str = "ratio"


_PHASE = {"stop": "Stopped", "start": "Ready", "create": "Ready"}
HELD_OUTSIDE = ("outside_vm", "outside_vm_without_disks")  # a vm case's target, held below its totals


def _engine_latency(r: dict[str, Any]) -> list[Row]:
    rows = []
    target = f"≤ {r.get('target_added_p50_ms', TARGET_ADDED_P50_MS):g} ms added"
    carried = r.get("carried_over") or {}
    for engine, verbs in r["results"].items():
        earlier = f" (run of {carried[engine].get('when')})" if engine in carried else ""
        for verb, case in verbs.items():
            ours = case["sandboxctl"]
            raw = case["raw_sdk_call"] if "raw_sdk_call" in case else case["raw_call"]
            raw_is = case.get("raw_call_is", "SDK call")
            outside = case.get("outside_vm") or {}
            held_below = case.get("target_held_to") in HELD_OUTSIDE and "added_p50_ms" in outside
            without_disks = case.get("target_held_to") == "outside_vm_without_disks"
            interval = case.get("added_p50_ms_95ci") or []
            rows.append(
                Row(
                    f"{engine} {verb}: command to {_PHASE.get(verb, verb)} queryable, p50 of {ours['n']}{earlier}",
                    f"{_ms(ours['p50_ms'])} (p99 {_ms(ours['p99_ms'])})",
                    f"{_ms(raw['p50_ms'])} (p99 {_ms(raw['p99_ms'])}) raw {raw_is}",
                    _added_ms(case["added_p50_ms"])
                    + (f" (95% interval {_added_ms(interval[0])} to {_added_ms(interval[1])})" if interval else ""),
                    "held on the next row: the VM's own time varies far more" if held_below else target,
                    None if held_below else case.get("target_met"),
                )
            )
            if "added_p50_ms" in outside:
                rows.append(
                    Row(
                        f"{engine} {verb}: the same without the VM's own time ({outside['is']}), "
                        f"p50 of {outside['sandboxctl']['n']}",
                        _ms(outside["sandboxctl"]["p50_ms"]),
                        f"{_ms(outside['raw']['p50_ms'])} raw",
                        _added_ms(outside["added_p50_ms"]),
                        "held on the next row: sandboxctl's disks are made ahead" if without_disks else target,
                        None
                        if without_disks
                        else outside["added_p50_ms"] <= r.get("target_added_p50_ms", TARGET_ADDED_P50_MS),
                    )
                )
            if "added_p50_ms_without_disks" in outside:
                rows.append(
                    Row(
                        f"{engine} {verb}: the same with the disks left out of both sides (sandboxctl took made-ahead "
                        f"disks in {case.get('took_spares', '?')} of {ours['n']}; the raw side makes its own in "
                        f"{_ms(case['raw_disks']['p50_ms'])} at p50)",
                        _ms(outside["sandboxctl"]["p50_ms"]),
                        f"{_ms(outside['raw_without_disks']['p50_ms'])} raw",
                        _added_ms(outside["added_p50_ms_without_disks"]),
                        target if without_disks else "none: reported",
                        case.get("target_met") if without_disks else None,
                    )
                )
    vm = r.get("vm") or {}
    if vm:
        rss = vm["rss_kib"]
        ours, raw = rss["sandboxctl"], rss["raw"]
        if ours.get("n") and raw.get("n"):
            rows.append(
                Row(
                    f"vm: resident memory (qemu VmRSS) per running VM sandbox, -m {vm['memory_mib']} MiB, "
                    f"{vm['cpus']} CPU, {vm['accelerator']}, p50 of {ours['n']}",
                    f"{ours['p50'] / 1024:,.1f} MiB",
                    f"{raw['p50'] / 1024:,.1f} MiB raw VM",
                    _ratio(ours["p50"] / raw["p50"]),
                    "none: reported",
                )
            )
        boot = vm["boot"]
        rows.append(
            Row(
                f"vm: boot, qemu launched to the guest's ready marker (Machine.boot), p50 of {boot['n']}",
                f"{_ms(boot['p50_ms'])} (p99 {_ms(boot['p99_ms'])})",
                NONE,
                NONE,
                "none: reported",
            )
        )
        fsck = vm.get("e2fsck_before_start")
        if fsck:
            rows.append(
                Row(
                    f"vm: the check of the clean 1 GiB workspace before each start (disks.check), p50 of {fsck['n']}",
                    f"{_ms(fsck['p50_ms'])} (p99 {_ms(fsck['p99_ms'])})",
                    NONE,
                    NONE,
                    "none: reported",
                )
            )
    return rows


def _bulk_stop(r: dict[str, Any]) -> list[Row]:
    rows = []
    for engine, case in r["results"].items():
        if not isinstance(case, dict):
            continue  # cli_noop_ms, shared by both engines
        trials = len(case["sandboxctl_stop_all_ms"])
        left = case.get("sandboxes_not_stopped", 0)
        rows.append(
            Row(
                f"{engine}: `stop --all` over {case['sandboxes']} sandboxes, median of {trials}"
                + (f"; {left} left not Stopped" if left else ""),
                _ms(case["sandboxctl_median_ms"]),
                f"{_ms(case['raw_best_median_ms'])} raw SDK, {case['raw_best_parallelism']} threads",
                _ratio(case["ratio"]),
                f"≤ {r.get('target_ratio', BULK_STOP_TARGET_RATIO):g}{TIMES}",
                case.get("target_met"),
            )
        )
    return rows


def _throughput(r: dict[str, Any]) -> list[Row]:
    rate = r["commands_per_s"]
    target = f"≥ {_rate(r['target_commands_per_s'])}"
    met = r.get("target_met")
    ours_cpu = r["cpu_us_per_command_all_processes"]
    bare_cpu = r["bare_round_cpu_us_per_command_all_processes"]
    sm_cpu = r["cpu_us_per_command_by_process"]["statemachine"]
    bare_sm_cpu = r["bare_round"]["cpu_us_per_command_by_process"]["statemachine"]
    return [
        Row(
            "accepted stop/start commands, against raw publish",
            _rate(rate),
            f"{_rate(r['raw_msgs_per_s'])} `js.publish_async` messages",
            _ratio(r["ratio_to_raw"]),
            target,
            met,
        ),
        Row(
            "accepted stop/start commands, against the bare round",
            _rate(rate),
            f"{_rate(r['bare_round_commands_per_s'])} bare rounds",
            _ratio(r["ratio_to_bare_round"]),
            target,
            met,
        ),
        Row(
            "CPU per command, all processes",
            _us(ours_cpu),
            f"{_us(bare_cpu)} bare round",
            _ratio(ours_cpu / bare_cpu),
        ),
        Row(
            "CPU per command, state-machine process",
            _us(sm_cpu),
            f"{_us(bare_sm_cpu)} bare round",
            _ratio(sm_cpu / bare_sm_cpu),
        ),
    ]


def _replay(r: dict[str, Any]) -> list[Row]:
    ours, raw, target, met = r["sandboxctl"], r["raw"], r["target"], r["target_met"]
    recovery = r["statemachine_recovery"]
    reader = f"raw read ({raw['reader']})"
    return [
        Row(
            f"rebuild the projection from {r['events']:,} events over {r['sandboxes']:,} sandboxes, "
            f"best of {len(ours['runs'])}",
            _rate(ours["events_per_s"], " events/s"),
            f"{_rate(raw['events_per_s'], ' events/s')} {reader}",
            _ratio(r["ratio"]),
            f"≥ {target['ratio']:g}{TIMES} and ≥ {_rate(target['events_per_s'], ' events/s')}",
            met.get("both") if isinstance(met, dict) else met,
        ),
        Row(
            "the same, median against median",
            _rate(ours["median_events_per_s"], " events/s"),
            f"{_rate(raw['median_events_per_s'], ' events/s')} {reader}",
            _ratio(r["median_ratio"]),
        ),
        Row(
            "a restarted state machine folding the same log (not a target)",
            _rate(recovery["events_per_s"], " events/s"),
            f"{_rate(raw['events_per_s'], ' events/s')} {reader}",
            _ratio(recovery["ratio"]),
        ),
    ]


def _memory(r: dict[str, Any]) -> list[Row]:
    return [
        Row(
            f"resident memory per sandbox, state machine holding {r['sandboxes']:,} Ready sandboxes",
            _bytes(r["bytes_per_sandbox"]),
            f"{_bytes(r['plain_dict_bytes_per_sandbox'])} plain dict of tuples",
            _ratio(r["ratio_to_plain_dict"]),
            f"≤ {_bytes(r['target_bytes_per_sandbox'])}",
            r.get("target_met"),
        )
    ]


def _lag(r: dict[str, Any]) -> list[Row]:
    rate = _rate(r["rate_target_per_s"], " events/s")
    raw_p50 = r["raw_reader"]["lag"]["p50_ms"]
    return [
        Row(
            f"append to queryable, p99 at {rate}",
            _ms(r["p99_ms"]),
            f"{_ms(r['raw_reader_p99_ms'])} log reader alone",
            f"{_added_ms(r['p99_ms'] - r['raw_reader_p99_ms'])} ({_ratio(r['ratio_p99_to_raw'])})",
            f"≤ {r['target_p99_ms']:g} ms",
            r.get("target_met"),
        ),
        Row(
            f"append to queryable, p50 at {rate}",
            _ms(r["p50_ms"]),
            f"{_ms(raw_p50)} log reader alone",
            f"{_added_ms(r['p50_ms'] - raw_p50)} ({_ratio(r['p50_ms'] / raw_p50 if raw_p50 > 0 else None)})",
        ),
    ]


_DURABILITY = {
    "creates_accepted_per_s": "sandboxctl creates accepted",
    "raw_sequential_per_s": "raw JetStream publish, one at a time",
    "raw_256_in_flight_per_s": "raw JetStream publish, 256 in flight",
}


def _durability(r: dict[str, Any]) -> list[Row]:
    always, default, cost = r["sync_always"], r["default_flush"], r["cost_ratio_always_to_default"]
    return [
        Row(_DURABILITY.get(key, key), _rate(always[key]), _rate(default[key]), _ratio(cost[key]), "none: reported")
        for key in default
    ]


def _cluster(r: dict[str, Any]) -> list[Row]:
    base_name = "R1, 1 state machine"
    base = r["cases"][base_name]
    rows = []
    for name, case in r["cases"].items():
        ratios = r["ratios"][name]
        rows.append(
            Row(
                f"label updates accepted, {name}",
                _rate(case["per_s"]) + "".join(f"; {n:,} {code}" for code, n in case["errors"].items()),
                f"{_rate(base['per_s'])} ({base_name})",
                _ratio(ratios["per_s"]),
            )
        )
        latency, base_latency = case["latency"], base["latency"]
        rows.append(
            Row(
                f"update latency p50 / p99, {name}",
                f"{_ms(latency['p50_ms'])} / {_ms(latency['p99_ms'])}",
                f"{_ms(base_latency['p50_ms'])} / {_ms(base_latency['p99_ms'])}",
                f"{_ratio(ratios['p50'])} / {_ratio(ratios['p99'])}",
            )
        )
        if "conflicts" in case:
            rows.append(
                Row(
                    f"appends refused by the sequence guard, {name}",
                    f"{case['conflicts']:,} ({case['conflicts_per_1000_accepted']:.1f} per 1,000 accepted)",
                    NONE,
                    NONE,
                    "none: reported",
                )
            )
    start = r["start"]
    rows.append(
        Row(
            f"a state machine's start to its first answer, log of {start['log_events']:,} events",
            _ms(start["with_snapshot_s"] * 1000) + " from its snapshot",
            _ms(start["without_snapshot_s"] * 1000) + " with no snapshot",
            _ratio(start["ratio_with_to_without"]),
            f"≤ {start['target_s']:g} s",
            start["target_met"],
        )
    )
    reader = start.get("reader")
    if reader:
        events = f"{reader['log_events']:,} events"
        rows.append(
            Row(
                f"a new reader replica's start (empty database) to its first answer, log of {events}",
                _ms(reader["with_snapshot_s"] * 1000) + " from the projectors' snapshot",
                _ms(reader["without_snapshot_s"] * 1000) + " with no snapshot",
                _ratio(reader["ratio_with_to_without"]),
                f"≤ {reader['target_s']:g} s",
                reader["target_met"],
            )
        )
    takeover = r["facts_takeover_s"]
    rows.append(
        Row(
            "facts applied again after kill -9 of the state machine applying them (R3, 2 state machines)",
            _ms(takeover * 1000),
            NONE,
            NONE,
            "≤ 2 s",
            takeover <= 2.0,
        )
    )
    return rows


def _cli(r: dict[str, Any]) -> list[Row]:
    rows = []
    here = " in its own interpreter (`SANDBOXCTL_FAST=0`)"
    for key, measured, baseline in (
        ("get", "`sandboxctl get NAME -o json`, wall time p50", "bare nats-py script"),
        ("stop_start", "`sandboxctl stop X && sandboxctl start X`, wall time p50", "`podman stop && podman start`"),
        ("get_here", f"`sandboxctl get NAME -o json`{here}", "bare nats-py script"),
        ("stop_start_here", f"`sandboxctl stop X && sandboxctl start X`{here}", "`podman stop && podman start`"),
        # The floor of any Python client in a process of its own, and what sandboxctl's code adds to it.
        ("bare_stop_start", "bare nats-py script's stop && start, wall time p50", "`podman stop && podman start`"),
        ("stop_start_over_bare", f"`sandboxctl stop X && sandboxctl start X`{here}", "bare script's pair"),
    ):
        case = r["results"].get(key)
        if case is None:
            continue
        rows.append(
            Row(
                measured,
                _ms(case["sandboxctl"]["p50_ms"]),
                f"{_ms(case['baseline']['p50_ms'])} ({baseline})",
                _ratio(case["ratio_p50"]),
                f"≤ {case['target_ratio']:g}{TIMES}",
                case["target_met"],
            )
        )
    if r["results"].get("cli_import_ms") is not None:
        rows.append(
            Row("`import sandboxctl.cli.main`", _ms(r["results"]["cli_import_ms"]), NONE, NONE, "none: reported")
        )
    return rows


def _placement(r: dict[str, Any]) -> list[Row]:
    base = r["baseline"]["latency"]
    rows = []
    for hosts, case in r["cases"].items():
        latency = case["latency"]
        rows.append(
            Row(
                f"create, request to reply, p50 / p99, {int(hosts):,} hosts announced (simulated)",
                f"{_ms(latency['p50_ms'])} / {_ms(latency['p99_ms'])}",
                f"{_ms(base['p50_ms'])} / {_ms(base['p99_ms'])} (no placement)",
                _ratio(case["ratio_p50_to_baseline"]),
            )
        )
        rows.append(
            Row(
                f"placing one create in process, {int(hosts):,} hosts",
                f"{case['index_us']:.1f} µs (index)",
                f"{case['scan_us']:.1f} µs (scan of every host)",
                _ratio(case["index_us"] / case["scan_us"]),
                "flat in the number of hosts",
            )
        )
    rows.append(
        Row(
            "growth from the fewest hosts to the most: placement in process / create p50",
            f"{_ratio(r['index_growth_largest_to_smallest'])} / {_ratio(r['create_p50_growth_largest_to_smallest'])}",
            NONE,
            NONE,
            "none: reported",
        )
    )
    return rows


LAYOUTS: dict[str, Layout] = {
    "engine_latency": Layout("Stop and start latency per engine", _engine_latency, versus="added at p50"),
    "cli": Layout("The command line against a bare script and podman's CLI", _cli),
    "throughput": Layout("Command throughput", _throughput),
    "bulk_stop": Layout("Bulk stop", _bulk_stop),
    "replay": Layout("Replay: rebuilding the projection from the log", _replay),
    "memory": Layout("Memory per sandbox", _memory),
    "lag": Layout("Projection lag", _lag, versus="added (ratio)"),
    "cluster": Layout("Replicas: three nodes, two state machines, take-over", _cluster, baseline="baseline, same run"),
    "placement": Layout("Placement: a create's cost at 10, 100 and 1,000 hosts", _placement),
    "durability": Layout(
        "Durability: fsync every write",
        _durability,
        ours="`sync_interval: always`",
        baseline="default flush, same run",
        versus="cost (ratio)",
    ),
}


def table(layout: Layout, rows: list[Row]) -> list[str]:
    head = ("measured", layout.ours, layout.baseline, layout.versus, "target", "met")
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|---:|---|---|"]
    for row in rows:
        cells = (row.measured, row.ours, row.baseline, row.versus, row.target, _met(row.met))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def figures_table(figures: list[tuple[str, str]]) -> list[str]:
    return ["| figure | value |", "|---|---|", *[f"| {_cell(k)} | {_cell(v)} |" for k, v in figures]]


# -- what was measured, where, and how to measure it again ----------------------------------


def code_line(result: dict[str, Any]) -> str:
    code = result.get("code")
    if not isinstance(code, dict):
        return "code not recorded"
    head = str(code.get("git_head", "n/a"))
    modified = code.get("product_modified", "n/a")
    sources = f"product sources sha256 `{code.get('product_sha256', '?')}`"
    if head == "n/a" or modified == "n/a":
        return f"code outside git, {sources}"
    text = f"commit `{head[:7]}`"
    if isinstance(modified, list) and modified:
        text += f" with uncommitted changes to {', '.join(f'`{m}`' for m in modified)} ({sources})"
    return text


def _version(value: Any) -> str:
    found = re.search(r"\d+(?:\.\d+)+[^\s,]*", str(value))
    return found.group(0) if found else str(value)


def machine_line(machine: Any) -> str:
    if not isinstance(machine, dict) or not machine:
        return "machine not recorded"
    parts = []
    for key, value in machine.items():
        if key == "cpus":
            parts.append(f"{value} CPUs")
        elif key == "python":
            parts.append(f"Python {value}")
        elif key in ("podman", "dockerd"):
            parts.append(f"{key} {_version(value)}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def _load1(value: Any) -> Iterator[float]:
    """Every ``load1`` a result recorded (runs that note the load they started under)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "load1" and isinstance(v, int | float):
                yield float(v)
            else:
                yield from _load1(v)
    elif isinstance(value, list):
        for v in value:
            yield from _load1(v)


def load_line(result: dict[str, Any]) -> str:
    before, after = result.get("load_average_before"), result.get("load_average_after")
    if isinstance(before, list) and isinstance(after, list) and before and after:
        return f"load average {before[0]:.2f} before, {after[0]:.2f} after (1 min)"
    seen = list(_load1(result))
    if seen:
        return f"load average {min(seen):.2f}-{max(seen):.2f} at the start of its runs (1 min)"
    return "load average not recorded"


def _link(path: Path) -> str:
    """A link from docs/ to a result file; an absolute path for results kept outside the repository."""
    target = path.resolve()
    shown = os.path.relpath(target, ROOT) if target.is_relative_to(ROOT) else str(target)
    href = os.path.relpath(target, DOCS) if target.is_relative_to(ROOT) else target.as_uri()
    return f"[{shown}]({href})"


def provenance(name: str, result: dict[str, Any], source: Path | None) -> str:
    parts = [
        f"Measured {result.get('when', 'at an unrecorded time')}",
        code_line(result),
        machine_line(result.get("machine")),
        load_line(result),
        f"reproduce: `{command(name)}`",
    ]
    if source is not None:
        parts.append(f"raw figures: {_link(source)}")
    return " · ".join(parts) + "."


# -- the page -------------------------------------------------------------------------------


def section(name: str, result: dict[str, Any], source: Path | None = None, plot: Path | None = None) -> str:
    layout = LAYOUTS.get(name)
    lines = [f"## {result.get('title') or (layout.title if layout else name)}", ""]
    figures = flattened(result)
    rows: list[Row] = []
    problem = "no table layout for this benchmark yet (bench/report.py LAYOUTS)"
    if layout is not None:
        try:
            rows = layout.rows(result)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
            problem = f"this result does not fit the table layout ({type(exc).__name__}: {exc})"
        else:
            problem = "the table layout found no cases in this result"
    if layout is not None and rows:
        lines += [*table(layout, rows), ""]
    else:
        lines += [f"Every figure as recorded: {problem}.", "", *figures_table(figures), ""]
    if plot is not None:
        title = result.get("title") or (layout.title if layout else name)
        lines += [f"![{_cell(str(title))}: the distributions]({os.path.relpath(plot.resolve(), DOCS)})", ""]
    lines += [provenance(name, result, source), ""]
    carried = result.get("carried_over")
    if isinstance(carried, dict):
        for part, measured in carried.items():
            if isinstance(measured, dict):
                lines += [
                    f"The {part} figures are from an earlier run, kept when this one measured only "
                    f"{', '.join(result.get('engines') or ['others'])}: measured {measured.get('when')}, "
                    f"{code_line(measured)}.",
                    "",
                ]
    for prose in ("summary", "notes"):
        if result.get(prose):
            lines += [str(result[prose]), ""]
    if layout is not None and rows:
        lines += [
            "<details>",
            "<summary>Every figure of this run</summary>",
            "",
            *figures_table(figures),
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def missing(name: str) -> str:
    layout = LAYOUTS.get(name)
    return f"## {layout.title if layout else name}\n\nNot measured yet: run `{command(name)}`.\n"


def unreadable(name: str, source: Path, error: Exception) -> str:
    layout = LAYOUTS.get(name)
    return (
        f"## {layout.title if layout else name}\n\n"
        f"The result {_link(source)} could not be read ({type(error).__name__}: {error}): "
        f"run `{command(name)}` again.\n"
    )


def render(results_dir: Path = RESULTS, plots: dict[str, Path] | None = None) -> str:
    """The page, from the results in ``results_dir``, with the ``plots`` drawn from them
    (bench.plots.draw) under their benchmarks' tables."""
    plots = plots or {}
    sources = {p.stem: p for p in sorted(results_dir.glob("*.json"))}
    parts = [INTRO]
    for name in (*ORDER, *sorted(set(sources) - set(ORDER))):
        if name not in sources:
            parts.append(missing(name))
            continue
        try:
            result = json.loads(sources[name].read_text())
            if not isinstance(result, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            parts.append(unreadable(name, sources[name], exc))
            continue
        parts.append(section(name, result, sources[name], plots.get(name)))
    extra = DOCS / "benchmarks-analysis.md"
    if extra.exists():
        parts.append(extra.read_text())
    return "\n".join(parts)


def main() -> None:
    from bench.plots import draw  # matplotlib: only to write the page, not to render it in a test

    out = DOCS / "benchmarks.md"
    out.write_text(render(plots=draw()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
