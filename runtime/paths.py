"""Where sandboxctl keeps its files by default: the data directory and the run directory.

Apart from runtime/config.py, which imports much of the package, so that the command line's
first step (cli/fast.py) finds the run directory importing nothing but the standard library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

RUN_DIR_ENV = "SANDBOXCTL_RUN_DIR"


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/sandboxctl")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sandboxctl"


def default_run_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/sandboxctl")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/sandboxctl-{os.getuid()}"
    return Path(base) / "sandboxctl"


def run_dir(env: Mapping[str, str]) -> Path:
    """The run directory ``env`` names (``SANDBOXCTL_RUN_DIR``), or the default one."""
    return Path(env[RUN_DIR_ENV]) if RUN_DIR_ENV in env else default_run_dir()
