"""Deadlines on real podman: a sandbox that overstays a transient phase fails with reason timeout."""

from __future__ import annotations

import asyncio
from datetime import datetime

from services.client import SandboxClient
from services.config import Config
from services.embedded import ControlPlane
from statemachine import Phase
from tests.conftest import podman


async def test_a_stop_that_overstays_its_deadline_becomes_error_timeout_and_can_be_deleted(
    config: Config, names, image: str
) -> None:
    config.deadlines = {"podman": {Phase.STOPPING: 1.0}}
    plane = await ControlPlane(config).start()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    try:
        name = names.new()
        # PID 1 ignores SIGTERM, and the stop's grace period (30 s) is far past the 1 s deadline.
        await client.create(name, image, command=["sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
        await client.wait_for(name, "Ready")
        reply = await client.stop(name, timeout=30)
        assert reply.phase == "Stopping"
        history = []
        for _ in range(100):
            history = await client.history(name)
            if history[-1]["phase"] == "Error":
                break
            await asyncio.sleep(0.1)
        failed = history[-1]
        overstayed = datetime.fromisoformat(failed["time"]) - datetime.fromisoformat(history[-2]["time"])
        assert failed["phase"] == "Error" and failed["data"]["reason"] == "timeout"
        assert failed["data"]["kind"] == "timeout" and failed["actor"] == "sandboxctl/watchdog"
        # From Error the user can act: delete removes it, even with the stop still hanging in the engine.
        reply = await client.delete(name)
        await client.wait_for(name, "Deleted", reply.seq, timeout=60)
        assert podman("container", "exists", f"sandboxctl-{name}", check=False).returncode != 0
        print(
            f"\ndeadlines: 1 sandbox hung in Stopping (deadline 1 s, grace period 30 s); Error/timeout "
            f"{overstayed.total_seconds():.2f}s after Stopping, recorded by the watchdog; deleted from Error "
            f"with the stop still hanging in the engine; sandboxes stuck 0"
        )
    finally:
        await client.close()
        await plane.stop()
