"""Each benchmark, in --quick mode: it runs, measures both sides and saves a
result that the report renders: the page shows that result's figures, not the
line of a benchmark that was not measured. The figures' values are not asserted;
speed is measured in bench/, not in timed tests. The page from a results folder,
without a run, is tests/unit/test_bench_report.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.engine_latency import vm_unavailable
from bench.report import ORDER, render
from tests.benchpage import assert_shows
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ORDER)
def test_benchmark_runs_in_quick_mode(name: str, tmp_path: Path, image: str) -> None:
    env = {**os.environ, "SANDBOXCTL_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quick" / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["machine"]["cpus"]
    assert_shows(render(tmp_path / "quick"), name, result)
    if name == "engine_latency" and not vm_unavailable():  # vm is in its default set where a VM can run
        assert set(result["results"]["vm"]) == {"stop", "start", "create"}
        assert result["vm"]["boot"]["n"] and result["vm"]["rss_kib"]["sandboxctl"]["n"]
