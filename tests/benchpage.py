"""What the benchmarks page (bench.report.render) must show of a result, written out here rather
than taken from the report: for the tests of the page (tests/unit/test_bench_report.py) and of
each benchmark's quick run (tests/e2e/test_bench.py)."""

from __future__ import annotations

from typing import Any

# Shown as prose or provenance, not as figures.
NOT_FIGURES = ("benchmark", "title", "summary", "notes", "when", "machine")


def not_measured(name: str) -> str:
    """The line the page gives a benchmark that has no result."""
    return f"Not measured yet: run `python -m bench.{name}`."


def _number(value: float) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,}"


def figures(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Each number a result saved, as (dotted key, the value as the page writes it)."""
    out: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((prefix, _number(value)))

    walk("", {k: v for k, v in result.items() if k not in NOT_FIGURES})
    return out


def assert_shows(page: str, name: str, result: dict[str, Any]) -> None:
    """The page shows ``result`` as what benchmark ``name`` measured: not as unmeasured, with the
    moment it was measured and a row for every number it saved."""
    assert not_measured(name) not in page, f"the page says {name} was not measured"
    assert str(result["when"]) in page, f"the page does not say when {name} was measured"
    numbers = figures(result)
    assert numbers, f"the {name} result has no figures to show"
    missing = [f"| {key} | {value} |" for key, value in numbers if f"| {key} | {value} |" not in page]
    assert missing == [], f"{len(missing)} of {len(numbers)} figures of {name} are not on the page: {missing[:5]}"
