"""Many hosts: driver workers on two hosts, each with an engine of its own (two podman services
with separate storage), against one real nats-server. Placement by constraint, by name and by
room; a work order reaches its host's worker only; a host name another live installation holds
is refused; ``sandboxctl hosts`` and ``list --host`` show where each sandbox is."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandboxctl.bus.hosts import HostTaken
from sandboxctl.client import SandboxClient
from sandboxctl.client.errors import FailedPrecondition
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, PodmanService, make_driver
from tests.conftest import CLI

pytestmark = pytest.mark.timeout(300)


class IsolatedPodman(PodmanService):
    """A podman service with storage of its own: another host's engine, on the same machine."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "podman.sock")
        self.root = root

    @property
    def storage(self) -> list[str]:
        return ["--root", str(self.root / "storage"), "--runroot", str(self.root / "run")]

    @property
    def argv(self) -> list[str]:
        return ["podman", *self.storage, "system", "service", "--time=0", self.url]


@pytest.fixture
def second_podman(tmp_path: Path, image: str) -> Iterator[IsolatedPodman]:
    service = IsolatedPodman(tmp_path / "host-b")
    saved = subprocess.run(["podman", "save", image], capture_output=True, check=True).stdout
    subprocess.run(["podman", *service.storage, "load"], input=saved, capture_output=True, check=True)
    service.start()
    yield service
    subprocess.run(["podman", *service.storage, "rm", "-af", "-t", "0"], capture_output=True)
    service.stop()


@pytest.fixture
async def two_hosts(
    config: Config, second_podman: IsolatedPodman, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlane, ControlPlane]]:
    a = dataclasses.replace(config, drivers=("podman",), host="host-a", host_labels={"zone": "a"}, host_max_sandboxes=4)
    b = dataclasses.replace(
        config,
        data_dir=tmp_path / "data-b",
        podman_url=second_podman.url,
        drivers=("podman",),
        host="host-b",
        host_labels={"zone": "b"},
        host_max_sandboxes=2,
    )
    plane = await ControlPlane(a).start()
    other = await ControlPlane(b, components=("worker",)).start()
    yield plane, other
    await other.stop()
    await plane.stop()


@pytest.fixture
async def hosts_client(config: Config, two_hosts: object) -> AsyncIterator[SandboxClient]:
    client = await SandboxClient.connect(config.nats_url, actor="test")
    yield client
    await client.close()


def names_on(config: Config) -> set[str]:
    return {info.sandbox for info in make_driver("podman", config).list_managed()}


async def test_sandboxes_are_placed_by_constraint_name_and_room_and_worked_on_their_host_only(
    two_hosts: tuple[ControlPlane, ControlPlane],
    hosts_client: SandboxClient,
    config: Config,
    capsys: pytest.CaptureFixture[str],
    names,
    image: str,
) -> None:
    plane, other = two_hosts
    client, cli = hosts_client, CLI(config, capsys)
    hosts = {h["name"]: h for h in await client.hosts()}
    assert set(hosts) == {"host-a", "host-b"}, hosts
    assert all(h["state"] == "ready" and h["engines"] == ["podman"] for h in hosts.values())
    assert hosts["host-b"]["labels"] == {"zone": "b"} and hosts["host-b"]["max_sandboxes"] == 2

    on_b = names.new("b")
    await client.create(on_b, image, constraints={"zone": "b"})
    await client.wait_for(on_b, "Ready", timeout=60)
    on_a = names.new("a")
    await client.create(on_a, image, host="host-a")
    await client.wait_for(on_a, "Ready", timeout=60)
    assert (await client.get(on_b))["host"] == "host-b" and (await client.get(on_a))["host"] == "host-a"
    # each engine holds its own host's container, and only that one
    assert on_b in names_on(other.config) and on_b not in names_on(plane.config)
    assert on_a in names_on(plane.config) and on_a not in names_on(other.config)

    # the work orders of a sandbox on host-b go to host-b's worker alone
    reply = await client.stop(on_b, timeout=1)
    await client.wait_for(on_b, "Stopped", reply.seq, timeout=60)
    reply = await client.start(on_b)
    await client.wait_for(on_b, "Ready", reply.seq, timeout=60)
    assert on_b not in names_on(plane.config)

    # nothing fits: refused, saying why for each host; nothing is created
    with pytest.raises(FailedPrecondition) as refused:
        await client.create(names.new("none"), image, constraints={"zone": "z"})
    assert "zone=z" in str(refused.value) and "host-a" in str(refused.value)
    with pytest.raises(FailedPrecondition, match="no host nowhere is announced"):
        await client.create(names.new("none"), image, host="nowhere")

    # by room: host-a takes 4, host-b 2, in proportion; then both are full
    placed = [names.new("fill") for _ in range(4)]
    for name in placed:
        await client.create(name, image)
    for name in placed:
        await client.wait_for(name, "Ready", timeout=60)
    rows = await client.list(host="host-a")
    assert sorted(r["name"] for r in rows) == sorted([on_a, *[n for n in placed if n in {r["name"] for r in rows}]])
    counts = {h["name"]: (h["placed"], h["running"]) for h in await client.hosts()}
    assert counts == {"host-a": (4, 4), "host-b": (2, 2)}, counts
    with pytest.raises(FailedPrecondition, match="full"):
        await client.create(names.new("over"), image)
    code, out, err = await cli("hosts")
    assert code == 0 and "host-a" in out and "ready" in out, err
    code, out, err = await cli("list", "--host", "host-b", "-o", "json")
    assert code == 0 and on_b in out and on_a not in out, err

    for name in [on_a, on_b, *placed]:
        reply = await client.delete(name)
        await client.wait_for(name, "Deleted", reply.seq, timeout=60)
    assert not names_on(other.config)


async def test_a_host_name_held_by_another_live_installation_is_refused(
    two_hosts: tuple[ControlPlane, ControlPlane], tmp_path: Path
) -> None:
    _, other = two_hosts
    taken = dataclasses.replace(other.config, data_dir=tmp_path / "data-c")
    with pytest.raises(HostTaken, match="host host-b is held by worker"):
        await ControlPlane(taken, components=("worker",)).start()
