"""Progress as people and programs see it: on a terminal, a bar of the sandboxes that got there
and each sandbox's phase as it moves; in a pipe, the same plain lines as ever and no escapes."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

from sandboxctl.client import SandboxClient
from sandboxctl.runtime.config import Config
from tests.conftest import ROOT, run_cli_process


def _drain(fd: int, into: bytearray) -> None:
    """Read the terminal's side until the program's end closes it."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: no one holds the other side any more
            return
        if not chunk:
            return
        into.extend(chunk)


async def test_a_stop_on_a_terminal_shows_a_bar_and_each_phase_and_a_pipe_gets_plain_lines(
    config: Config, client: SandboxClient, names, image: str
) -> None:
    made = [names.new("prog"), names.new("prog")]
    for name in made:
        assert (await client.create(name, image)).accepted
    for name in made:
        await client.wait_for(name, "Ready")

    terminal, program_side = os.openpty()
    screen = bytearray()
    reader = threading.Thread(target=_drain, args=(terminal, screen), daemon=True)
    reader.start()
    env = {**os.environ, "SANDBOXCTL_NATS_URL": config.nats_url, "TERM": "xterm", "COLUMNS": "120"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "stop", *made, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=program_side,
    )  # fmt: skip
    os.close(program_side)
    out, _ = await proc.communicate()
    await asyncio.to_thread(reader.join, 10)
    os.close(terminal)
    shown = screen.decode(errors="replace")
    assert proc.returncode == 0, shown
    assert out.decode().strip() == "2 sandboxes stopped"  # stdout: what a script reads, unchanged
    for name in made:
        assert f"{name}: Stopped" in shown, shown
    assert "2/2" in shown and "\x1b[" in shown, shown  # the bar, drawn with the terminal's escapes

    code, out_text, err = await run_cli_process(config, "start", *made)
    assert code == 0, err
    assert out_text.strip() == "2 sandboxes started" and err == ""
    assert "\x1b" not in out_text + err
