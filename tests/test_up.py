"""``sandboxctl up`` as a user runs it: its own nats-server, every service,
and a clean stop on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from services.embedded import free_port
from tests.conftest import ROOT, podman


async def _sandboxctl(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *argv, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_up_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path, podman_url: str, image: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SANDBOXCTL_DATA_DIR": str(tmp_path / "data"),
        "SANDBOXCTL_RUN_DIR": str(tmp_path / "run"),
        "SANDBOXCTL_PODMAN_URL": podman_url,
        "SANDBOXCTL_NATS_URL": f"nats://127.0.0.1:{port}",
    }
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "up", "--port", str(port), env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    name = f"up-{port}"
    try:
        assert up.stdout is not None
        banner = await asyncio.wait_for(up.stdout.readline(), 60)
        assert b"sandboxctl is up" in banner and b"drivers podman" in banner, banner  # the engines it found
        code, _, err = await _sandboxctl(env, "create", name, "--image", image)
        assert code == 0, err
        code, out, err = await _sandboxctl(env, "get", name, "-o", "json")
        assert code == 0 and json.loads(out)["phase"] == "Ready", err
        code, _, err = await _sandboxctl(env, "delete", name)
        assert code == 0, err
        up.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(up.communicate(), 30)
        assert up.returncode == 0, rest.decode()
        assert b"Traceback" not in rest, rest.decode()
        with pytest.raises(ConnectionRefusedError):  # the embedded nats-server went with it
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)
