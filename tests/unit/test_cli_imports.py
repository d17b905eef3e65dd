"""A CLI call imports what its verb needs and no more: neither the services, the drivers, the
projection's SQLite, the state machine's transitions nor the metrics library is loaded to send a
command or ask a query. The speed this buys is measured in bench/cli.py; this keeps it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Loaded by none of the verbs below: they belong to the services, the operators' tools, or output
# formats a call did not ask for.
HEAVY = (
    "sandboxctl.services",
    "sandboxctl.drivers",
    "sandboxctl.audit",
    "sandboxctl.statemachine.decider",
    "transitions",
    "aiosqlite",
    "prometheus_client",
    "docker",
    "podman",
    "yaml",
    "rich",
    "opentelemetry",  # only once a call traces (observe.tracing)
    "starlette",  # the web console's, loaded by up and serve alone
    "uvicorn",
)


def loaded(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("verb", ["get", "stop", "start", "list", "create"])
def test_a_verb_loads_nothing_heavy(verb: str) -> None:
    modules = loaded(f"from sandboxctl.cli.main import build_parser\nbuild_parser({verb!r})")
    assert heavy_in(modules) == []


def test_the_sdk_loads_nothing_heavy() -> None:
    assert heavy_in(loaded("import sandboxctl.client")) == []


def test_a_verbs_parser_is_that_verbs_alone_and_any_other_word_gets_the_whole() -> None:
    from sandboxctl.cli.main import build_parser

    def verbs(parser: object) -> list[str]:
        return sorted(parser._subparsers._group_actions[0].choices)  # type: ignore[attr-defined]

    assert verbs(build_parser("stop")) == ["stop"]
    assert "stop" in verbs(build_parser("frobnicate")) and len(verbs(build_parser(None))) > 20
    args = build_parser("stop").parse_args(["stop", "a", "--grace", "3"])
    assert args.names == ["a"] and args.grace == 3.0
