"""Archive on every engine: a Stopped sandbox's workspace moves into the JetStream object store
and its volume and container are removed; start restores the files exactly and it is Ready;
delete removes the archive too; archive of a sandbox that is not Stopped is refused."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from nats.js.errors import NotFoundError

from sandboxctl.bus.streams import workspaces
from sandboxctl.client import EXIT_STATUS, SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.replies import ErrorCode
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from sandboxctl.statemachine import Phase
from testing.serve import Service
from tests.conftest import CLI, Engine, until
from tests.e2e.test_clone import LISTING, TREE, listing


async def test_an_archived_workspace_leaves_the_engine_and_start_brings_it_back_exact(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    name = names.new("arc")
    assert (await cli("create", name, "--image", image, "--driver", engine.name))[0] == 0
    engine("exec", f"sandboxctl-{name}", "sh", "-c", TREE)
    before = engine("exec", f"sandboxctl-{name}", "sh", "-c", LISTING.replace("cd /w", "cd /workspace")).stdout
    code, _, err = await cli("archive", name)
    assert code == EXIT_STATUS[ErrorCode.FAILED_PRECONDITION] and "archive is allowed in Stopped" in err, err
    assert (await cli("stop", name, "--grace", "0"))[0] == 0
    code, out, err = await cli("archive", name)
    assert code == 0 and "1 sandbox archived" in out, err
    item = await client.get(name)
    assert item["phase"] == "Archived", item
    assert not engine.container_exists(name) and not engine.volume_exists(name)
    store = await workspaces(client.nc.jetstream())
    stored = await store.get_info(subjects.workspace_object(name, item["sandbox_id"]))
    assert stored.size and stored.size > 3_000_000

    code, _, err = await cli("start", name)
    assert code == 0, err
    assert (await client.get(name))["phase"] == Phase.READY
    after = engine("exec", f"sandboxctl-{name}", "sh", "-c", LISTING.replace("cd /w", "cd /workspace")).stdout
    assert after == before and len(after.splitlines()) > 8
    code, _, err = await cli("delete", name)
    assert code == 0, err


BIG = 160_000_000  # bytes of random data: an archive or restore of it takes seconds, long enough to cut


@pytest.fixture
async def split_plane(config: Config) -> AsyncIterator[tuple[ControlPlane, Service]]:
    """The control plane in this process but for its driver worker, which runs in a process of
    its own (``sandboxctl serve --only worker``), to be killed with SIGKILL."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOXCTL_")},
        "SANDBOXCTL_NATS_URL": config.nats_url,
        "SANDBOXCTL_DATA_DIR": str(config.data_dir),
        "SANDBOXCTL_RUN_DIR": str(config.run_dir),
        "SANDBOXCTL_PODMAN_URL": config.podman_url,
        "SANDBOXCTL_DOCKER_URL": config.docker_url,
        "SANDBOXCTL_DRIVERS": ",".join(config.drivers),
        "SANDBOXCTL_DEFAULT_DRIVER": config.default_driver,
    }
    worker = Service("worker", env, config.data_dir)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    plane = await ControlPlane(config, components=("statemachine", "projector", "query")).start()
    try:
        await asyncio.to_thread(worker.start)
        yield plane, worker
    finally:
        worker.stop()
        await plane.stop()


async def test_a_worker_killed_in_the_middle_of_an_archive_or_a_restore_loses_nothing(
    split_plane: tuple[ControlPlane, Service], config: Config, names, image: str, engine: Engine
) -> None:
    """SIGKILL of the worker while the workspace streams into the store leaves the volume where it
    is (the object is not whole); the next worker archives it again, even with the container gone.
    SIGKILL while it streams back leaves the object in the store; the next worker restores it
    again. The files come back exact."""
    _, worker = split_plane
    client = await SandboxClient.connect(config.nats_url, actor="test")
    try:
        name = names.new("cut")
        reply = await client.create(name, image, driver=engine.name)
        await client.wait_for(name, Phase.READY, reply.seq, timeout=60)
        engine("exec", f"sandboxctl-{name}", "sh", "-c", f"{TREE} && head -c {BIG} /dev/urandom > /workspace/big")
        reply = await client.stop(name, timeout=0)
        stopped = await client.wait_for(name, Phase.STOPPED, reply.seq, timeout=60)
        before = listing(engine, image, name)
        store = await workspaces(client.nc.jetstream())
        obj = subjects.workspace_object(name, stopped["sandbox_id"])
        bucket = client.nc.jetstream()

        async def streaming_in() -> bool:
            info = await bucket.stream_info(subjects.WORKSPACES_STREAM)
            return info.state.bytes > BIG // 4

        await client.archive(name)
        await until(streaming_in, "archive streaming into the store", timeout=60)
        await asyncio.to_thread(worker.kill)
        assert (await client.get(name))["phase"] == Phase.ARCHIVING
        with pytest.raises(NotFoundError):
            await store.get_info(obj)  # not whole, so not there
        assert engine.volume_exists(name)  # and the volume is kept
        # The container goes too (as when an archive is cut between its two removals): the volume
        # alone is archived, through a container made again to read it by.
        engine("rm", "-f", f"sandboxctl-{name}")
        await asyncio.to_thread(worker.start)
        archived = await client.wait_for(name, Phase.ARCHIVED, timeout=120)
        assert not engine.volume_exists(name)
        stored = await store.get_info(obj)
        assert archived["archive"] == obj and stored.size is not None and stored.size > BIG

        async def streaming_out() -> bool:
            if not engine.volume_exists(name):
                return False
            try:
                return 0 < (engine.workspace_path(name) / "big").stat().st_size < BIG  # a part of the files is back
            except FileNotFoundError:
                return False

        await client.start(name)
        await until(streaming_out, "the restore streaming into the volume", timeout=60)
        await asyncio.to_thread(worker.kill)
        assert (await client.get(name))["phase"] == Phase.STARTING
        assert (await store.get_info(obj)).size == stored.size  # the object stays until a restore is done
        await asyncio.to_thread(worker.start)
        await client.wait_for(name, Phase.READY, timeout=120)
        assert listing(engine, image, name) == before
        with pytest.raises(NotFoundError):
            await store.get_info(obj)  # dropped once restored
        await client.delete(name)
    finally:
        await client.close()
