"""Sandbox names complete from the projection, in real bash, zsh and fish, where a verb takes an
existing sandbox's name (and not where it takes a new one); ``list -o name`` is what they ask."""

from __future__ import annotations

import asyncio
import os

import pytest

from sandboxctl.client import SandboxClient
from sandboxctl.runtime.config import Config
from tests.completion_shells import candidates
from tests.conftest import run_cli_process


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
async def test_names_of_existing_sandboxes_complete_where_a_verb_takes_one(
    shell: str, config: Config, client: SandboxClient, names, image: str
) -> None:
    made = [names.new("cmp"), names.new("cmp")]
    for name in made:
        assert (await client.create(name, image)).accepted
    code, out, err = await run_cli_process(config, "list", "-o", "name")
    assert code == 0 and set(made) <= set(out.split()), err
    env = {**os.environ, "SANDBOXCTL_NATS_URL": config.nats_url}
    prefix = made[0][: made[0].rindex("-")]
    for line in (f"sandboxctl stop {prefix}", f"sandboxctl get {prefix}", f"sandboxctl lease acquire {prefix}",
                 f"sandboxctl stop --timeout 5 {made[0]} {prefix}"):  # fmt: skip
        assert await asyncio.to_thread(candidates, shell, line, env) == sorted(made), line
    assert await asyncio.to_thread(candidates, shell, f"sandboxctl create {prefix}", env) == []
