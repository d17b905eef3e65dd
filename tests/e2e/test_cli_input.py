"""``delete --all`` is confirmed by a person or by ``--yes``, against the real services on a real
engine. The command line's other refusals: bad input is tests/unit/test_cli_input.py, a wrong
password and a reader that goes away tests/integration/test_cli_input.py."""

from __future__ import annotations

import asyncio
import os
import pty
import sys

from sandboxctl.runtime.config import Config
from tests.conftest import CLI, ROOT, phase


async def _cli_on_a_terminal(config: Config, answer: str, *argv: str) -> tuple[int, str, str]:
    """The console script in its own process, its stdin a terminal on which ``answer`` is typed."""
    master, slave = pty.openpty()
    env = {**os.environ, "SANDBOXCTL_NATS_URL": config.nats_url, "SANDBOXCTL_DATA_DIR": str(config.data_dir)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", *argv, env=env, cwd=ROOT,
        stdin=slave, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(slave)
    try:
        os.write(master, answer.encode())
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        os.close(master)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_delete_all_asks_a_person_and_refuses_a_script_without_yes(
    cli: CLI, config: Config, names, image: str
) -> None:
    made = [names.new() for _ in range(2)]
    for name in made:
        assert (await cli("create", name, "--image", image, "--no-wait"))[0] == 0

    code, _, err = await cli("delete", "--all")  # stdin is not a terminal here
    assert code == 2 and err.startswith("sandboxctl: invalid_argument: delete --all would delete 2 sandboxes"), err
    assert "say --yes" in err
    code, _, err = await _cli_on_a_terminal(config, "no\n", "delete", "--all")
    assert code == 5 and "deletes 2 sandboxes (" in err and "DESTROYS THEIR WORKSPACES" in err, err
    assert err.rstrip().endswith("sandboxctl: failed_precondition: not confirmed: nothing was deleted"), err
    for name in made:
        assert await phase(cli, name) != "Deleted"

    code, out, err = await _cli_on_a_terminal(config, "yes\n", "delete", "--all")
    assert code == 0 and out.splitlines() == [*(f"{n}: deleted" for n in sorted(made)), "2 sandboxes deleted"], out
    for name in made:
        assert await phase(cli, name) == "Deleted"
    code, out, err = await cli("delete", "--all")  # nothing left to delete: nothing to ask
    assert code == 0 and out == "no sandbox to delete\n", err
