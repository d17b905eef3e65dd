"""The benchmarks page (bench.report.render) from a results folder, without running a benchmark:
a result's figures are on it, and a benchmark without one says it was not measured. Each
benchmark's quick run, rendered the same way, is tests/e2e/test_bench.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import ORDER, render
from tests.benchpage import assert_shows, figures, not_measured

SMALL = {
    "benchmark": "memory",
    "when": "2026-12-01T10:00:00+00:00",
    "machine": {"cpus": 2, "python": "3.11.7"},
    "sandboxes": 1000,
    "bytes_per_sandbox": 1234.5,
    "plain_dict_bytes_per_sandbox": 612.25,
    "ratio_to_plain_dict": 2.016,
    "target_bytes_per_sandbox": 2048,
    "target_met": True,
    "runs": [{"sandboxes": 1000, "rss_bytes": 41_234_567}],
}


def test_a_result_in_the_folder_is_on_the_page_with_its_figures(tmp_path: Path) -> None:
    (tmp_path / "memory.json").write_text(json.dumps(SMALL))
    page = render(tmp_path)
    assert_shows(page, "memory", SMALL)
    assert "| bytes_per_sandbox | 1,234.5 |" in page and "| runs[0].rss_bytes | 41,234,567 |" in page
    for name in ORDER:
        if name != "memory":
            assert not_measured(name) in page, name


def test_an_empty_folder_says_every_benchmark_was_not_measured(tmp_path: Path) -> None:
    page = render(tmp_path)
    for name in ORDER:
        assert not_measured(name) in page, name
    with pytest.raises(AssertionError, match="not measured"):
        assert_shows(page, "memory", SMALL)
    assert not [row for row in (f"| {k} | {v} |" for k, v in figures(SMALL)) if row in page]
