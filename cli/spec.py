"""What a sandbox is made of, from the command line: ``--cpus``, ``--memory``, ``--pids``,
``--env`` and ``--env-file``, read as docker and podman read them and checked against the
bounds of events/limits.py before anything is sent. Each parser raises ValueError with the
line the user sees."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from sandboxctl.events.limits import (
    CPUS_MAX,
    ENV_KEY_MAX,
    ENV_KEY_PATTERN,
    ENV_MAX,
    ENV_VALUE_MAX,
    MEMORY_MAX,
    MEMORY_MIN,
    PIDS_MAX,
    PIDS_MIN,
    SEQ_MAX,
)
from sandboxctl.events.spec import Resources
from sandboxctl.runtime.config import SIZE_UNITS, parse_size

_ENV_KEY = re.compile(ENV_KEY_PATTERN)
ENV_FILE_MAX = 1024 * 1024  # bytes: an env file is a short list of settings, never read without bound


def _size(value: int) -> str:
    for unit in ("t", "g", "m", "k"):
        if value % SIZE_UNITS[unit] == 0:
            return f"{value // SIZE_UNITS[unit]}{unit}"
    return f"{value}b"


def memory(text: str) -> int:
    """``512m``, ``1g``, ``1.5g``, ``268435456``: bytes, as docker's ``--memory`` reads them (units
    of 1024; ``b``, ``k``, ``m``, ``g``, ``t``), from MEMORY_MIN to MEMORY_MAX."""
    value = parse_size(text, "--memory")
    if not MEMORY_MIN <= value <= MEMORY_MAX:
        raise ValueError(
            f"--memory {text[:40]}: must be from {_size(MEMORY_MIN)} (the engines' minimum) to {_size(MEMORY_MAX)}"
        )
    return value


def cpus(text: str) -> float:
    """``1.5``: CPUs as a fraction of cores, more than 0 and at most CPUS_MAX."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--cpus {text[:40]!r}: a number of CPUs such as 0.5 or 2") from None
    if not math.isfinite(value) or value <= 0 or value > CPUS_MAX:
        raise ValueError(f"--cpus {text[:40]}: must be more than 0 and at most {CPUS_MAX:g}")
    if round(value * 1000) < 1:
        raise ValueError(f"--cpus {text[:40]}: at least 0.001")
    return value


def pids(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--pids {text[:40]!r}: a whole number of processes such as 256") from None
    if not PIDS_MIN <= value <= PIDS_MAX:
        raise ValueError(f"--pids {value}: must be from {PIDS_MIN} to {PIDS_MAX}")
    return value


def resources(cpus_text: str | None, memory_text: str | None, pids_text: str | None) -> Resources:
    return Resources(
        cpus=None if cpus_text is None else cpus(cpus_text),
        memory=None if memory_text is None else memory(memory_text),
        pids=None if pids_text is None else pids(pids_text),
    )


def _env_pair(key: str, value: str, where: str, env: dict[str, str]) -> None:
    if not _ENV_KEY.fullmatch(key):
        raise ValueError(
            f"{where}: {key[:80]!r} is not a variable name (1-{ENV_KEY_MAX} letters, digits and '_', "
            "not starting with a digit)"
        )
    if len(value) > ENV_VALUE_MAX:
        raise ValueError(f"{where}: the value of {key} is longer than {ENV_VALUE_MAX} characters")
    if "\x00" in value:
        raise ValueError(f"{where}: the value of {key} contains a NUL byte")
    env[key] = value


def environment(pairs: Sequence[str], files: Sequence[str], outside: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--env KEY=VALUE`` (repeatable) and ``--env-file FILE``, as docker reads them: a file holds
    ``KEY=VALUE`` lines, ``#`` comments and blank lines; a bare ``KEY``, in a file or a flag,
    takes the value this process has (and is left out when it has none). The files come first,
    then the flags, and a later setting of a key wins."""
    outside = os.environ if outside is None else outside
    env: dict[str, str] = {}
    for file in files:
        path = Path(file)
        try:
            with path.open("rb") as f:
                data = f.read(ENV_FILE_MAX + 1)
        except OSError as exc:
            raise ValueError(f"--env-file {file}: {exc.strerror or exc}") from None
        if len(data) > ENV_FILE_MAX:
            raise ValueError(f"--env-file {file}: larger than {ENV_FILE_MAX} bytes")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ValueError(f"--env-file {file}: not UTF-8 text") from None
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            key, sep, value = line.lstrip().partition("=")
            if not sep:
                key = key.strip()
                if key in outside:
                    _env_pair(key, outside[key], f"--env-file {file}:{number}", env)
                continue
            _env_pair(key, value, f"--env-file {file}:{number}", env)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            if key in outside:
                _env_pair(key, outside[key], "--env", env)
            elif not _ENV_KEY.fullmatch(key):
                _env_pair(key, "", "--env", env)  # says why the name is wrong
            continue
        _env_pair(key, value, "--env", env)
    if len(env) > ENV_MAX:
        raise ValueError(f"{len(env)} environment variables: at most {ENV_MAX}")
    return env


def expected_seq(text: str | None) -> int | None:
    """``--if-seq N``: the log sequence the sandbox must still be at (its ``last_seq``)."""
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,19}", text) or int(text) > SEQ_MAX:
        raise ValueError(f"--if-seq {text[:40]!r}: a log sequence, a whole number from 0 (as get shows it: last_seq)")
    return int(text)
