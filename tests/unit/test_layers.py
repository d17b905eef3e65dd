"""The rooms import one way, from the contract up to the command line, and everything under one
name. Read from the code's own import statements (functions' late imports included), so a
module that reaches up a layer fails here, not in a reviewer's head."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Lowest first: each room may import only the rooms before it (and itself).
LAYERS = (
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
OLD_NAMES = frozenset(LAYERS)  # the names the rooms had before they were one package


def imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_every_room_imports_only_the_rooms_below_it() -> None:
    wrong: list[str] = []
    for rank, room in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((ROOT / room).rglob("*.py")):
            for line, module in imports(path):
                parts = module.split(".")
                if parts[0] in OLD_NAMES:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}: use sandboxctl.{module}")
                elif parts[0] == "sandboxctl" and len(parts) > 1 and parts[1] not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {module}, a room above it")
    assert wrong == []


def test_the_client_sdk_imports_no_service_and_no_runner() -> None:
    """Other services embed the SDK: it speaks the contract through the NATS plumbing, nothing more,
    and carries the caller's trace context (observe.tracing, not the metrics)."""
    reached = {
        ".".join(module.split(".")[1:3]) if module.startswith("sandboxctl.observe") else module.split(".")[1]
        for path in (ROOT / "client").rglob("*.py")
        for _, module in imports(path)
        if module.startswith("sandboxctl.")
    }
    assert reached <= {"events", "statemachine", "bus", "client", "observe.tracing"}, reached


def test_the_tests_and_benchmarks_use_the_one_import_name_too() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for folder in ("tests", "bench", "testing")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in imports(path)
        if module.split(".")[0] in OLD_NAMES
    ]
    assert wrong == []


def test_a_room_exports_lazily_exactly_what_it_imports_for_type_checkers() -> None:
    """``__all__`` and the ``TYPE_CHECKING`` imports (which lazy_exports serves) name the same
    things, and each resolves to its module's own object."""
    import importlib

    from sandboxctl import type_checking_imports

    lazy = [p.parent.name for p in ROOT.glob("*/__init__.py") if "lazy_exports(__name__)" in p.read_text()]
    assert {"auth", "events", "statemachine"} <= set(lazy), lazy  # and any room that exports so later
    for room in lazy:
        package = importlib.import_module(f"sandboxctl.{room}")
        imported = type_checking_imports(str(ROOT / room / "__init__.py"))
        assert sorted(package.__all__) == sorted(imported), room
        for name, module in imported.items():
            assert getattr(package, name) is getattr(importlib.import_module(module), name), (room, name)
        assert set(package.__all__) <= set(dir(package))
