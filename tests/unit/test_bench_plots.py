"""The page's plots (bench.plots): drawn from a result's samples, embedded under its table, and
never left stale once a result has nothing to draw. The figures here are made up: what is tested
is the drawing, not a measurement."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import percentiles
from bench.plots import draw
from bench.report import render

PNG = b"\x89PNG\r\n\x1a\n"


def latency(ours: list[float], raw: list[float]) -> dict[str, object]:
    return {"sandboxctl": percentiles(ours, keep=True), "raw_sdk_call": percentiles(raw, keep=True)}


def engine_result(keep: bool = True) -> dict[str, object]:
    ours, raw = [0.110 + i / 1000 for i in range(20)], [0.100 + i / 1000 for i in range(20)]
    ops = {verb: latency(ours, raw) for verb in ("stop", "start")}
    if not keep:
        for op in ops.values():
            for side in op.values():
                side.pop("samples_ms")  # type: ignore[attr-defined]
    return {"benchmark": "engine_latency", "when": "2026-12-02 10:00:00 UTC", "results": {"podman": ops}}


def test_a_result_with_samples_is_drawn_and_shown_under_its_table(tmp_path: Path) -> None:
    results, plots = tmp_path / "results", tmp_path / "plots"
    results.mkdir()
    (results / "engine_latency.json").write_text(json.dumps(engine_result()))
    drawn = draw(results, plots)
    assert set(drawn) == {"engine_latency"}
    png = drawn["engine_latency"].read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000  # an image with four curves, not an empty canvas
    assert draw(results, plots)["engine_latency"].read_bytes() == png  # same figures, same bytes
    page = render(results, drawn)
    assert "![Stop and start latency per engine: the distributions](" in page
    assert "samples_ms" not in page  # the samples are drawn, not listed


def test_a_result_without_samples_removes_the_old_plot(tmp_path: Path) -> None:
    results, plots = tmp_path / "results", tmp_path / "plots"
    results.mkdir()
    (results / "engine_latency.json").write_text(json.dumps(engine_result()))
    old = draw(results, plots)["engine_latency"]
    (results / "engine_latency.json").write_text(json.dumps(engine_result(keep=False)))
    assert draw(results, plots) == {}
    assert not old.exists()
    assert "the distributions" not in render(results, {})


def test_throughput_is_drawn_from_its_rates(tmp_path: Path) -> None:
    (tmp_path / "throughput.json").write_text(
        json.dumps(
            {
                "commands_per_s": 3600.0,
                "bare_round_commands_per_s": 5500.0,
                "raw_msgs_per_s": 39000.0,
                "cpu_us_per_command_all_processes": 521.0,
                "bare_round_cpu_us_per_command_all_processes": 343.5,
            }
        )
    )
    drawn = draw(tmp_path, tmp_path / "plots")
    assert drawn["throughput"].read_bytes().startswith(PNG)
