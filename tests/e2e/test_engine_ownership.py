"""sandboxctl acts only on what carries its sandbox's id, on every engine: a container made by
hand that mounts a sandbox's workspace, or that took the sandbox's container name, is never
stopped, started, exec'd into, read or removed by sandboxctl; a delete that would need it gone
fails with a reason instead of succeeding: sandboxctl's own when it sees the other container first,
the engine's when the engine is the one to refuse, and either way the CLI exits 10 (failed) with
it and the sandbox is in Error with it. What makes an object a sandbox's is
tests/unit/test_engine_ownership.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from sandboxctl.client import EXIT_STATUS, ClientCode, SandboxClient
from sandboxctl.drivers.base import ContainerMissing
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, make_driver
from tests.conftest import CLI, Engine

FAILED = EXIT_STATUS[ClientCode.FAILED]  # 10: the sandbox went to Error while the CLI waited
# What each engine says when it refuses to remove a volume a container uses.
IN_USE = {"podman": "being used", "docker": "in use"}


def running(engine: Engine, container: str) -> bool:
    return bool(json.loads(engine("container", "inspect", container).stdout)[0]["State"]["Running"])


async def test_a_delete_leaves_a_container_it_does_not_own_that_uses_the_workspace(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("shared")
    code, _, err = await cli("create", name, "--image", image, "--driver", engine.name)
    assert code == 0, err
    engine("exec", f"sandboxctl-{name}", "sh", "-c", "echo kept > /workspace/f")
    other = f"{name}-byhand"
    engine(
        "run", "-d", "--name", other, "--network", "none",
        "-v", f"sandboxctl-{name}-workspace:/data", image, "sleep", "1000",
    )  # fmt: skip
    try:
        code, _, err = await cli("delete", name)
        assert code == FAILED, ("the delete did not fail while another container uses the workspace", code, err)
        assert len(err.strip().splitlines()) == 1 and other in err, err
        item = await client.get(name)
        assert item["phase"] == "Error" and item["last_error"].startswith("delete failed: "), item
        assert other in item["last_error"]
        # nothing was touched: the other container runs, the sandbox's container and files are there
        assert running(engine, other)
        assert engine.container_exists(name) and engine.volume_exists(name)
        assert engine("exec", other, "cat", "/data/f").stdout == "kept\n"

        engine("rm", "-f", other)
        code, _, err = await cli("delete", name)
        assert code == 0, err
        assert not engine.container_exists(name) and not engine.volume_exists(name)
    finally:
        engine("rm", "-f", other, check=False)


def test_the_engine_refuses_to_remove_a_workspace_in_use_and_the_driver_says_why(
    config: Config, names, image: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a container starts using the workspace after the delete looked (a race), the engine's
    refusal is the last guard: the volume is never removed by force, and the message is the engine's."""
    from sandboxctl.drivers.base import SandboxSpec

    name = names.new("race")
    driver = make_driver(engine.name, config)
    other = f"{name}-byhand"
    try:
        driver.create(SandboxSpec(name=name, sandbox_id="sb-race", image=image))
        engine("run", "-d", "--name", other, "--network", "none",
               "-v", f"sandboxctl-{name}-workspace:/data", image, "sleep", "1000")  # fmt: skip
        monkeypatch.setattr(driver, "_volume_users", lambda volume: [])  # the delete looked before it came
        with pytest.raises(Exception) as failure:
            driver.delete(name, "sb-race")
        assert type(failure.value).__name__ == "DriverError" and failure.value.operation == "delete"
        assert "use" in failure.value.message, failure.value.message  # podman: "being used", docker: "in use"
        assert running(engine, other) and engine.volume_exists(name)
    finally:
        engine("rm", "-f", other, check=False)
        driver.close()


async def test_a_delete_the_engine_refuses_is_surfaced_with_its_exit_code_the_engines_reason_and_error(
    cli: CLI,
    client: SandboxClient,
    plane: ControlPlane,
    names,
    image: str,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race above, through the whole plane: a container comes to use the workspace after the
    delete looked, so the engine refuses to remove the volume. The user is told, in one line and
    with exit 10, in the engine's own words; the sandbox is in Error with them; the workspace and
    the other container are untouched; and once that container is gone a delete again succeeds."""
    name = names.new("refused")
    code, _, err = await cli("create", name, "--image", image, "--driver", engine.name)
    assert code == 0, err
    engine("exec", f"sandboxctl-{name}", "sh", "-c", "echo kept > /workspace/f")
    other = f"{name}-byhand"
    engine("run", "-d", "--name", other, "--network", "none",
           "-v", f"sandboxctl-{name}-workspace:/data", image, "sleep", "1000")  # fmt: skip
    (worker,) = [w for w in plane.workers if w.driver.name == engine.name]
    monkeypatch.setattr(worker.driver, "_volume_users", lambda volume: [])  # the delete looked before it came
    try:
        code, _, err = await cli("delete", name)
        assert code == FAILED, (code, err)
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"sandboxctl: failed: sandbox {name} is Error: delete failed: "), err
        assert IN_USE[engine.name] in err, err  # the engine's reason ...
        assert "sandboxctl leaves it alone" not in err, err  # ... not sandboxctl's own refusal
        # The log says why: the failure the delete met, the engine's reason in it; and the row
        # keeps that reason, though the engine's watcher reports the container (removed before the
        # volume was refused) as gone afterwards.
        failures = [h for h in await client.history(name) if h["type"].split(".")[2] == "failed"]
        assert len(failures) == 1 and failures[0]["phase"] == "Error", failures
        reason = failures[0]["data"]["reason"]
        assert reason.startswith("delete failed: ") and IN_USE[engine.name] in reason and reason in err, reason
        await asyncio.sleep(1)  # time for the watcher's report of the removal
        item = await client.get(name)
        assert item["phase"] == "Error" and item["last_error"] == reason, item
        # nothing of the user's was touched
        assert running(engine, other) and engine.volume_exists(name)
        assert engine("exec", other, "cat", "/data/f").stdout == "kept\n"

        engine("rm", "-f", other)
        code, _, err = await cli("delete", name)
        assert code == 0, err
        assert not engine.volume_exists(name) and (await client.get(name))["phase"] == "Deleted"
    finally:
        engine("rm", "-f", other, check=False)


async def test_a_container_made_by_hand_under_the_sandboxs_name_is_never_acted_on(
    cli: CLI, client: SandboxClient, config: Config, names, image: str, engine: Engine
) -> None:
    name = names.new("impostor")
    reply = await client.create(name, image, driver=engine.name)
    sandbox_id = (await client.wait_for(name, "Ready", reply.seq))["sandbox_id"]
    driver = make_driver(engine.name, config)
    try:
        assert driver.inspect(name, sandbox_id) is not None  # the driver has seen the sandbox's container
        engine("rm", "-f", f"sandboxctl-{name}")
        assert (await client.wait_for(name, "Error", timeout=15))["last_error"] == "backend_missing"

        # Someone makes a container under the name, labelled as managed but with no sandbox id of ours.
        engine("create", "--name", f"sandboxctl-{name}", "--network", "none",
               "--label", "sandboxctl.managed=true", "--label", f"sandboxctl.sandbox={name}",
               image, "sleep", "1000")  # fmt: skip
        code, _, err = await cli("start", name)
        assert code != 0, "start took over a container made by hand"
        assert "belongs to sandbox id (none)" in err, err
        assert not running(engine, f"sandboxctl-{name}"), "sandboxctl started a container it does not own"

        engine("start", f"sandboxctl-{name}")
        for attempt in (
            lambda: driver.stop(name, sandbox_id, 0),
            lambda: driver.start(name, sandbox_id),
            lambda: driver.exec(name, sandbox_id, ["true"], lambda fd, chunk: None),
            lambda: list(driver.logs(name, sandbox_id)),
            lambda: driver.interactive(name, sandbox_id, ["sh"], False),
        ):
            with pytest.raises(ContainerMissing, match="not sandbox"):
                attempt()
        assert driver.inspect(name, sandbox_id) is None
        assert running(engine, f"sandboxctl-{name}"), "sandboxctl stopped a container it does not own"

        code, _, err = await cli("delete", name)
        assert code == 0, err
        assert engine.container_exists(name) and running(engine, f"sandboxctl-{name}")
        assert not engine.volume_exists(name)  # the sandbox's own workspace is gone, as a delete promises
    finally:
        driver.close()
