"""Shell completion of verbs, flags and their values, in real bash, zsh and fish: the scripts
``sandboxctl completion SHELL`` prints, with nothing running (names: tests/e2e/test_completion.py)."""

from __future__ import annotations

import pytest

from sandboxctl.cli.completion import verbs_of
from sandboxctl.cli.main import build_parser
from tests.completion_shells import candidates

SHELLS = ("bash", "zsh", "fish")


@pytest.mark.parametrize("shell", SHELLS)
def test_verbs_sub_verbs_flags_and_their_values_complete(shell: str) -> None:
    assert candidates(shell, "sandboxctl st") == ["start", "status", "stop"]
    assert candidates(shell, "sandboxctl lease ") == ["acquire", "release", "renew"]
    assert candidates(shell, "sandboxctl audit re") == ["replay"]
    assert "--timeout" in candidates(shell, "sandboxctl stop --t")
    assert candidates(shell, "sandboxctl list -o ") == ["json", "name", "table", "yaml"]
    assert candidates(shell, "sandboxctl list --phase Ready --output y") == ["yaml"]
    assert "Stopped" in candidates(shell, "sandboxctl list --phase ")
    assert candidates(shell, "sandboxctl exec box -- ") == []  # the command run in the sandbox is the shell's


def test_bash_completes_the_value_after_an_equals_sign() -> None:
    """bash splits ``--output=j`` into ``--output``, ``=`` and ``j``."""
    assert candidates("bash", "sandboxctl list --output = j") == ["json"]
    assert candidates("bash", "sandboxctl list --output = ") == ["json", "name", "table", "yaml"]


def test_every_verb_of_the_parser_is_in_the_scripts_and_only_existing_sandboxes_are_names() -> None:
    verbs = {v.path: v for v in verbs_of(build_parser())}
    assert set(verbs[""].verbs) >= {"create", "stop", "start", "delete", "completion", "audit"}
    named = {path for path, v in verbs.items() if v.names}
    assert {"stop", "start", "delete", "get", "exec", "logs", "lease acquire", "clone", "audit history"} <= named
    assert not named & {"create", "user add", "user remove", "host drain", "cp", "list", ""}
