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


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Any, Any]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) that import an exported name's module
    the first time the name is used.

    ``modules`` maps each submodule to the names the package exports from it. Importing one light
    module of a room (``sandboxctl.events.replies``, ``sandboxctl.statemachine.phases``) then runs
    no other: a CLI call pays only for what its verb uses. The package lists the same imports under
    ``TYPE_CHECKING``, so type checkers see every name as it is."""
    where = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
