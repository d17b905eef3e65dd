"""Stops on every engine: a second stop with a shorter grace ends a long one's wait (the engine
is asked again at once, not after the first grace), a stop that overlaps another ends by its own
deadline whatever the engine does with two stops, and no grace value makes a driver raise."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sandboxctl.client import SandboxClient
from sandboxctl.drivers.base import SandboxSpec
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import make_driver
from tests.conftest import CLI, Engine

# PID 1 ignores SIGTERM: only the SIGKILL at the end of the grace stops it.
IGNORES_TERM = ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"]
ENDS_ON_TERM = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]


@pytest.mark.timeout(120)
async def test_a_second_stop_with_a_shorter_grace_ends_the_wait(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("shorter")
    reply = await client.create(name, image, command=IGNORES_TERM, driver=engine.name)
    await client.wait_for(name, "Ready", reply.seq)
    code, _, err = await cli("stop", name, "--grace", "600", "--no-wait")
    assert code == 0, err
    await asyncio.sleep(1.5)  # the first stop is in the engine, waiting out its grace
    assert (await client.get(name))["phase"] == "Stopping"
    assert engine.state(name)["Pid"], "the container stopped on SIGTERM: nothing was tested"
    began = time.monotonic()
    code, _, err = await cli("stop", name, "--grace", "1", "--timeout", "30")
    assert code == 0, err
    assert time.monotonic() - began < 10
    assert (await client.get(name))["phase"] == "Stopped"
    state = engine.state(name)
    assert state["Running"] is False and state["ExitCode"] == 137  # killed at the end of the shorter grace


@pytest.mark.timeout(60)
def test_an_overlapping_stop_ends_by_its_own_deadline_even_if_the_engine_keeps_the_first(
    config: Config, names, image: str, engine: Engine
) -> None:
    """Podman 4.3 and docker honour a shorter second grace themselves; an engine that kept the
    first one's would still see the container killed at the second's deadline (plus a margin)."""
    name = names.new("overlap")
    driver = make_driver(engine.name, config)
    try:
        driver.create(SandboxSpec(name=name, sandbox_id="sb-o", image=image, command=IGNORES_TERM))
        driver.start(name, "sb-o")
        real = driver._stop
        driver._stop = lambda container_id, grace: real(container_id, 600)  # an engine deaf to a shorter grace
        first = threading.Thread(target=driver.stop, args=(name, "sb-o", 600), daemon=True)
        first.start()
        time.sleep(1.5)
        began = time.monotonic()
        info = driver.stop(name, "sb-o", 1)
        assert not info.running and time.monotonic() - began < 8
        first.join(10)
        assert not first.is_alive()
    finally:
        driver.close()


@pytest.mark.parametrize("grace", [float("inf"), float("nan"), -5.0, 1e300], ids=["inf", "nan", "negative", "huge"])
def test_no_grace_value_makes_a_stop_raise(config: Config, names, image: str, engine: Engine, grace: float) -> None:
    name = names.new("grace")
    driver = make_driver(engine.name, config)
    try:
        driver.create(SandboxSpec(name=name, sandbox_id="sb-g", image=image, command=ENDS_ON_TERM))
        driver.start(name, "sb-g")
        began = time.monotonic()
        info = driver.stop(name, "sb-g", grace)
        assert not info.running and time.monotonic() - began < 15
    finally:
        driver.close()
