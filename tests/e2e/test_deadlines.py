"""Deadlines on real podman: a sandbox that overstays a transient phase fails with reason timeout."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import datetime
from pathlib import Path

from sandboxctl.client import SandboxClient
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, PodmanService
from sandboxctl.statemachine import Phase
from tests.conftest import podman


async def test_a_stop_that_overstays_its_deadline_becomes_error_timeout_and_can_be_deleted(
    config: Config, names, image: str, tmp_path: Path
) -> None:
    """An engine that stops answering in the middle of a stop (its API service frozen with
    SIGSTOP) must not leave the sandbox in Stopping: past the deadline, counted from the end of
    the grace asked for, it fails with reason timeout; from Error it can be deleted, and the
    delete completes once the engine answers again."""
    engine = PodmanService(tmp_path / "podman" / "podman.sock").start()  # frozen below: a service of its own
    config.podman_url, config.drivers, config.default_driver = engine.url, ("podman",), "podman"
    config.deadlines = {"podman": {Phase.STOPPING: 1.0}}
    plane = await ControlPlane(config).start()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    assert engine.proc is not None
    try:
        name = names.new()
        # PID 1 ignores SIGTERM: the engine would kill it after the 3 s grace, had it not frozen.
        await client.create(name, image, command=["sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
        await client.wait_for(name, "Ready")
        reply = await client.stop(name, timeout=3)
        assert reply.phase == "Stopping"
        os.kill(engine.proc.pid, signal.SIGSTOP)
        history = []
        for _ in range(200):
            history = await client.history(name)
            if history[-1]["phase"] == "Error":
                break
            await asyncio.sleep(0.1)
        failed = history[-1]
        overstayed = datetime.fromisoformat(failed["time"]) - datetime.fromisoformat(history[-2]["time"])
        assert failed["phase"] == "Error" and failed["data"]["reason"] == "timeout"
        assert failed["data"]["kind"] == "timeout" and failed["actor"] == "sandboxctl/watchdog"
        assert overstayed.total_seconds() >= 3 + 1  # not before the grace and the deadline have both passed
        # From Error the user can act: delete is accepted at once, and done once the engine is back.
        reply = await client.delete(name)
        await asyncio.sleep(1)
        os.kill(engine.proc.pid, signal.SIGCONT)
        await client.wait_for(name, "Deleted", reply.seq, timeout=90)
        assert podman("container", "exists", f"sandboxctl-{name}", check=False).returncode != 0
        print(
            f"\ndeadlines: 1 sandbox hung in Stopping (engine frozen, grace 3 s, deadline 1 s); Error/timeout "
            f"{overstayed.total_seconds():.2f}s after Stopping, recorded by the watchdog; deleted from Error "
            f"once the engine answered again; sandboxes stuck 0"
        )
    finally:
        os.kill(engine.proc.pid, signal.SIGCONT)
        await client.close()
        await plane.stop()
        engine.stop()
