"""Moments as people and programs read them: the time from now in a table, ISO 8601 (UTC) in
JSON and YAML, never a bare Unix time."""

from __future__ import annotations

import json

import pytest
import yaml

from sandboxctl.cli.output import ago, moments_as_iso, show, table

NOW = 1_764_700_000.0  # 2025-12-02T18:26:40Z


@pytest.mark.parametrize(
    ("moment", "said"),
    [(NOW - 12, "12s ago"), (NOW - 190, "3m ago"), (NOW - 7300, "2h ago"), (NOW - 3 * 86_400, "3d ago"),
     (NOW + 300, "in 5m"), ("2025-12-02T18:26:28Z", "12s ago"), ("2025-12-02T18:26:28+00:00", "12s ago"),
     (0.0, ""), (None, "")],
)  # fmt: skip
def test_a_table_gives_a_moment_as_the_time_from_now(moment: object, said: str) -> None:
    assert ago(moment, NOW) == said


def test_json_and_yaml_give_every_moment_as_iso_8601_at_any_depth() -> None:
    state = {"name": "a", "seq": 7, "since": NOW, "stop_by": 0.0, "leases": [{"holder": "ci", "expires": NOW + 60}],
             "warning": {"kind": "stop", "deadline": NOW + 1.5, "grace": 60.0}}  # fmt: skip
    out = moments_as_iso(state)
    assert out["since"] == "2025-12-02T18:26:40.000Z" and out["stop_by"] is None
    assert out["leases"][0]["expires"] == "2025-12-02T18:27:40.000Z"
    assert out["warning"] == {"kind": "stop", "deadline": "2025-12-02T18:26:41.500Z", "grace": 60.0}
    assert out["seq"] == 7 and state["since"] == NOW  # the rest as it was; the input untouched


def test_show_prints_iso_in_json_and_yaml_and_aligned_columns(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"name": "a", "phase": "Ready", "since": NOW}, {"name": "longer", "phase": "Stopped", "since": NOW}]
    show(rows, "json")
    assert json.loads(capsys.readouterr().out)[0]["since"] == "2025-12-02T18:26:40.000Z"
    show(rows[0], "yaml")
    assert yaml.safe_load(capsys.readouterr().out)["since"] == "2025-12-02T18:26:40.000Z"
    lines = table(rows, ("name", "phase", "since")).splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "SINCE"] and lines[1].index("Ready") == lines[2].index("Stopped")
    assert lines[1].endswith(" ago")
