"""sandboxctl: a lifecycle control plane for sandboxes, under one import name.

The rooms of the repository are its subpackages, lowest first; each imports only
from the ones before it (tests/unit/test_layers.py checks it):

- ``sandboxctl.events``: the wire contract (``events/``);
- ``sandboxctl.statemachine``: the pure core, decide, react, evolve (``statemachine/``);
- ``sandboxctl.bus``: NATS and JetStream plumbing, the log read and written (``bus/``);
- ``sandboxctl.client``: the Python SDK (``client/``);
- ``sandboxctl.auth``: users, roles and permissions (``auth/``);
- ``sandboxctl.drivers``: the container engines (``drivers/``);
- ``sandboxctl.services``: the long-running processes (``services/``);
- ``sandboxctl.audit``: the operators' tools on the log (``audit/``);
- ``sandboxctl.runtime``: configuration, ``up`` and ``serve``, supervision, health (``runtime/``);
- ``sandboxctl.cli``: the command line (``cli/``).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str) -> tuple[Any, Any]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) that import an exported name's module
    the first time the name is used.

    The names and their modules are the package's own imports under ``if TYPE_CHECKING:``, read
    from its source the first time a name is missed: type checkers see every name as it is, and
    importing one light module of a room (``sandboxctl.events.replies``,
    ``sandboxctl.statemachine.phases``) runs no other, so a CLI call pays only for what its verb
    uses. ``__all__`` lists the same names (tests/unit/test_layers.py checks that it does)."""
    where: dict[str, str] = {}

    def modules() -> dict[str, str]:
        if not where:
            try:
                where.update(type_checking_imports(sys.modules[package].__file__ or ""))
            except (OSError, SyntaxError) as exc:  # no source installed: no name is found
                raise AttributeError(f"module {package!r} cannot list its exports: {exc}") from None
        return where

    def __getattr__(name: str) -> Any:
        module = modules().get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(modules()))

    return __getattr__, __dir__


def type_checking_imports(path: str) -> dict[str, str]:
    """Each name imported under ``if TYPE_CHECKING:`` in the module at ``path``, to its module."""
    import ast

    found: dict[str, str] = {}
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
                    found.update({alias.asname or alias.name: statement.module for alias in statement.names})
    return found
