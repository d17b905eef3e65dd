"""Completion as each shell computes it, for the completion tests: the script sandboxctl prints,
loaded in a real bash, zsh or fish, asked for the candidates of one command line."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# bash and zsh run the completion function as bash and zsh's bashcompinit do (zsh under sh
# emulation, filtering the candidates itself, as its completion system does); fish answers
# ``complete -C`` with what it would offer.
_BASH = (
    'eval "$SCRIPT"; COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _sandboxctl; '
    'printf "%s\\n" "${COMPREPLY[@]}"'
)
_ZSH = (
    'eval "$SCRIPT"; ask() { emulate -L sh; setopt kshglob noshglob braceexpand; COMP_WORDS=("$@"); '
    'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _sandboxctl; printf "%s\\n" "${COMPREPLY[@]}"; }; ask "$@"'
)
_FISH = 'eval $SCRIPT; complete -C "$argv"'


@functools.cache
def script(shell: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "sandboxctl.cli", "completion", shell], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip


def candidates(shell: str, line: str, env: dict[str, str] | None = None) -> list[str]:
    """What ``shell`` offers for the command line ``line`` (its last word is the one completed;
    a trailing space completes a new word)."""
    words = line.split(" ")
    run_env = {
        **(env or os.environ),
        "SCRIPT": script(shell),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    if shell == "fish":
        argv = ["fish", "--no-config", "-c", _FISH, line]
    else:
        argv = [shell, "-c", _BASH if shell == "bash" else _ZSH, shell, *words]
    if shell == "zsh":
        argv.insert(1, "-f")
    done = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    out = [c.split("\t")[0] for c in done.stdout.splitlines() if c]
    if shell == "zsh":  # zsh's completion system keeps those that begin with the word
        out = [c for c in out if c.startswith(words[-1])]
    return sorted(out)
