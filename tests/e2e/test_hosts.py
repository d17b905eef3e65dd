"""Many hosts: driver workers on two hosts, each with an engine of its own (two podman services
with separate storage), against one real nats-server. Placement by constraint, by name and by
room; a work order reaches its host's worker only; a host name another live installation holds
is refused; ``sandboxctl hosts`` and ``list --host`` show where each sandbox is."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandboxctl.auth import AuthStore
from sandboxctl.bus.hosts import HostTaken
from sandboxctl.client import PermissionDenied, SandboxClient, SandboxError
from sandboxctl.client.errors import FailedPrecondition
from sandboxctl.client.sdk import CLOSE_WAIT
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer, PodmanService, make_driver
from tests.authkit import ADMIN_USER, Raw, auth_config, make_store
from tests.conftest import CLI, until

pytestmark = pytest.mark.timeout(300)
HEARTBEAT = 5.0  # seconds: the hosts' heartbeat window, short for the test


class IsolatedPodman(PodmanService):
    """A podman service with storage of its own: another host's engine, on the same machine."""

    def __init__(self, root: Path) -> None:
        # podman refuses a runroot of 50 characters or more, and a socket's path is bounded too
        self.short = Path(tempfile.mkdtemp(prefix="sbx-host-", dir="/tmp"))
        super().__init__(self.short / "podman.sock")
        self.root = root

    @property
    def storage(self) -> list[str]:
        return ["--root", str(self.root / "storage"), "--runroot", str(self.short / "run")]

    @property
    def argv(self) -> list[str]:
        return ["podman", *self.storage, "system", "service", "--time=0", self.url]


@pytest.fixture
def second_podman(tmp_path: Path, image: str) -> Iterator[IsolatedPodman]:
    service = IsolatedPodman(tmp_path / "host-b")
    saved = subprocess.run(["podman", "save", image], capture_output=True, check=True).stdout
    loaded = subprocess.run(["podman", *service.storage, "load"], input=saved, capture_output=True)
    assert loaded.returncode == 0, loaded.stderr.decode()[-2000:]
    service.start()
    yield service
    subprocess.run(["podman", *service.storage, "rm", "-af", "-t", "0"], capture_output=True)
    subprocess.run(["podman", *service.storage, "volume", "prune", "-f"], capture_output=True)
    service.stop()
    shutil.rmtree(service.short, ignore_errors=True)


@pytest.fixture
async def two_hosts(
    request: pytest.FixtureRequest, config: Config, second_podman: IsolatedPodman, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlane, ControlPlane]]:
    """host-a (zone=a) with the test's podman, host-b (zone=b) with a podman of its own; their
    most sandboxes are 4 and 2 unless the test asks for others (indirect parametrization)."""
    most_a, most_b = getattr(request, "param", (4, 2))
    a = dataclasses.replace(
        config,
        drivers=("podman",),
        host="host-a",
        host_labels={"zone": "a"},
        host_max_sandboxes=most_a,
        heartbeat=HEARTBEAT,
    )
    b = dataclasses.replace(
        config,
        data_dir=tmp_path / "data-b",
        podman_url=second_podman.url,
        drivers=("podman",),
        host="host-b",
        host_labels={"zone": "b"},
        host_max_sandboxes=most_b,
        heartbeat=HEARTBEAT,
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


async def phase_of(client: SandboxClient, name: str, phase: str) -> bool:
    return bool((await client.get(name))["phase"] == phase)


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
    # heard from within the window, by the query service's own clock
    assert all(0 <= h["last_heartbeat"] <= HEARTBEAT and h["heartbeat_window"] == HEARTBEAT for h in hosts.values())

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
    # every fact about it came from host-b's worker
    reporters = {e["actor"] for e in await client.history(on_b) if e["actor"].startswith("sandboxctl/driver/")}
    assert reporters == {"sandboxctl/driver/podman/host-b"}, reporters

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
    on_host_a = {r["name"] for r in await client.list(host="host-a")}
    assert on_a in on_host_a and on_b not in on_host_a and len(on_host_a) == 4, on_host_a
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


async def test_a_host_that_goes_away_fails_what_ran_there_and_reconciles_when_it_returns(
    two_hosts: tuple[ControlPlane, ControlPlane],
    hosts_client: SandboxClient,
    second_podman: IsolatedPodman,
    names,
    image: str,
) -> None:
    _, other = two_hosts
    client = hosts_client
    running, stopped, elsewhere = names.new("run"), names.new("stopped"), names.new("a")
    for name, where in ((running, "host-b"), (stopped, "host-b"), (elsewhere, "host-a")):
        await client.create(name, image, host=where)
    for name in (running, stopped, elsewhere):
        await client.wait_for(name, "Ready", timeout=60)
    reply = await client.stop(stopped, timeout=1)
    await client.wait_for(stopped, "Stopped", reply.seq, timeout=60)

    # host-b's worker and its engine go away together
    await other.stop()
    second_podman.stop()
    began = time.monotonic()
    await until(lambda: phase_of(client, running, "Error"), f"{running} in Error", timeout=HEARTBEAT + 15)
    took = time.monotonic() - began
    assert took <= HEARTBEAT + 5, f"host_lost after {took:.1f}s"
    lost = await client.get(running)
    assert lost["last_error"].startswith("host_lost") and lost["unreachable"] is True
    kept = await client.get(stopped)
    assert kept["phase"] == "Stopped" and kept["unreachable"] is True
    assert (await client.get(elsewhere))["phase"] == "Ready" and (await client.get(elsewhere))["unreachable"] is False
    states = {h["name"]: h["state"] for h in await client.hosts()}
    assert states == {"host-a": "ready", "host-b": "lost"}, states

    # it comes back: its reconciliation brings each sandbox to what its engine shows
    second_podman.start()
    back = await ControlPlane(other.config, components=("worker",)).start()
    try:
        await until(lambda: phase_of(client, running, "Ready"), f"{running} Ready again", timeout=60)
        assert (await client.get(stopped))["phase"] == "Stopped"
        assert (await client.get(running))["unreachable"] is False
        for name in (running, stopped, elsewhere):
            reply = await client.delete(name)
            await client.wait_for(name, "Deleted", reply.seq, timeout=60)
    finally:
        await back.stop()


async def test_a_drained_host_takes_nothing_new_and_stop_all_host_stops_only_its_sandboxes(
    two_hosts: tuple[ControlPlane, ControlPlane],
    hosts_client: SandboxClient,
    config: Config,
    capsys: pytest.CaptureFixture[str],
    names,
    image: str,
) -> None:
    client, cli = hosts_client, CLI(config, capsys)
    on_a, on_b = names.new("a"), names.new("b")
    await client.create(on_a, image, host="host-a")
    await client.create(on_b, image, host="host-b")
    for name in (on_a, on_b):
        await client.wait_for(name, "Ready", timeout=60)
    code, _, err = await cli("host", "drain", "host-a")
    assert code == 0, err
    assert {h["name"]: h["state"] for h in await client.hosts()}["host-a"] == "draining"
    fresh = names.new("fresh")
    await client.create(fresh, image)
    assert (await client.get(fresh))["host"] == "host-b"  # host-a has more room, but is drained
    await client.wait_for(fresh, "Ready", timeout=60)
    with pytest.raises(FailedPrecondition, match="draining"):
        await client.create(names.new("x"), image, host="host-a")
    code, _, err = await cli("host", "drain", "nowhere")
    assert code != 0 and "no host nowhere is announced" in err
    code, _, err = await cli("host", "undrain", "host-a")
    assert code == 0, err

    code, _, err = await cli("stop", "--all", "--host", "host-b", "--grace", "1")
    assert code == 0, err
    assert (await client.get(on_b))["phase"] == "Stopped" and (await client.get(fresh))["phase"] == "Stopped"
    assert (await client.get(on_a))["phase"] == "Ready"
    for name in (on_a, on_b, fresh):
        reply = await client.delete(name)
        await client.wait_for(name, "Deleted", reply.seq, timeout=60)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("two_hosts", [(140, 70)], indirect=True)
async def test_two_hundred_creates_at_once_split_two_to_one_between_hosts_of_capacities_two_to_one(
    two_hosts: tuple[ControlPlane, ControlPlane], hosts_client: SandboxClient, names, image: str
) -> None:
    client = hosts_client
    made = [names.new("s") for _ in range(200)]
    replies = await asyncio.gather(*(client.create(name, image) for name in made))
    assert all(r.accepted and r.appended for r in replies)
    placed = {h["name"]: h["placed"] for h in await client.hosts()}
    print(f"\n200 creates at once on hosts of 140 and 70 sandboxes: {placed}")
    assert sum(placed.values()) == 200 and abs(placed["host-a"] - 2 * placed["host-b"]) <= 3, placed
    # each host's worker made them all, then deletes them: one engine operation at a time per sandbox
    for name, reply in zip(made, replies, strict=True):
        await client.wait_for(name, "Ready", reply.seq, timeout=600)
    async for page in client.bulk("delete", all=True):
        assert all(item.accepted for item in page.items)
    for name in made:
        await client.wait_for(name, "Deleted", timeout=600)


@pytest.fixture
def store(tmp_path: Path) -> AuthStore:
    """The users of ``auth_server`` (conftest): an admin, a reader, a writer, the services'."""
    return make_store(tmp_path / "auth")


async def test_with_authentication_a_hosts_workers_work_as_users_of_their_own_that_reach_no_other_host(
    auth_server: NatsServer,
    store: AuthStore,
    second_podman: IsolatedPodman,
    podman_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    names,
    image: str,
) -> None:
    config = auth_config(tmp_path / "a", auth_server.url, store, podman_url)
    admin = store.credentials(ADMIN_USER)
    cli = CLI(dataclasses.replace(config, user=admin.user, password=admin.password), capsys)
    # on the machine that holds the users: host-b's workers get users of their own, written for it
    code, out, err = await cli("host", "add", "host-b", "--engine", "podman", "--output", str(tmp_path / "b-auth"))
    assert code == 0 and "sandboxctl-driver-podman-host-b" in out, err
    code, out, err = await cli("user", "list")
    assert code == 0 and "driver-podman on host host-b" in out, err
    code, _, err = await cli("host", "add", "no.such")
    assert code != 0 and "host 'no.such' must be" in err
    on_b = dataclasses.replace(
        config,
        data_dir=tmp_path / "data-b",
        podman_url=second_podman.url,
        host="host-b",
        auth_dir=tmp_path / "b-auth",  # host-b's machine holds its own credentials, and no other
    )
    plane = await ControlPlane(config).start()
    other = await ControlPlane(on_b, components=("worker",)).start()
    writer_creds = store.credentials("writer")
    writer = await SandboxClient.connect(config.nats_url, user=writer_creds.user, password=writer_creds.password)
    raw_creds = AuthStore(tmp_path / "b-auth").credentials("sandboxctl-driver-podman-host-b")
    raw = await Raw.connect(config.nats_url, AuthStore(tmp_path / "b-auth"), raw_creds.user)
    try:
        assert other.auth_enabled
        sandbox = names.new("b")
        await writer.create(sandbox, image, host="host-b")
        await writer.wait_for(sandbox, "Ready", timeout=60)
        assert sandbox in names_on(on_b) and sandbox not in names_on(config)
        reply = await writer.stop(sandbox, timeout=1)
        await writer.wait_for(sandbox, "Stopped", reply.seq, timeout=60)

        # host-b's worker user may announce host-b alone, and read no other host's work orders
        key = f"$KV.{subjects.HOSTS_BUCKET}.{config.host}"
        await raw.refused(key, raw.js.publish(key, b"{}"))
        durable = f"sandboxctl-driver-podman-{config.host}"
        info = f"$JS.API.CONSUMER.INFO.{subjects.LOG_STREAM}.{durable}"
        await raw.refused(info, raw.js.consumer_info(subjects.LOG_STREAM, durable))
        # nor report facts about another host's sandboxes, nor take over those placed on no host
        forged = subjects.fact(sandbox, config.host)
        await raw.refused(forged, raw.js.publish(forged, b"{}"))
        unplaced = f"$KV.{subjects.HOSTS_BUCKET}.unplaced.podman"
        await raw.refused(unplaced, raw.js.publish(unplaced, b"host-b"))
        legacy = f"$JS.API.CONSUMER.INFO.{subjects.LOG_STREAM}.sandboxctl-driver-podman"
        await raw.refused(legacy, raw.js.consumer_info(subjects.LOG_STREAM, "sandboxctl-driver-podman"))

        # draining is an admin's: a writer is refused at once, not left to time out
        began = time.monotonic()
        with pytest.raises(PermissionDenied, match="may not drain hosts"):
            await writer.drain("host-b")
        assert time.monotonic() - began < 2.0
        assert {h["name"]: h["state"] for h in await writer.hosts()}["host-b"] == "ready"

        reply = await writer.delete(sandbox)
        await writer.wait_for(sandbox, "Deleted", reply.seq, timeout=60)
        # the users go: host-b's worker is refused from the next time it connects
        code, _, err = await cli("host", "remove", "host-b")
        assert code == 0, err
        assert "sandboxctl-driver-podman-host-b" not in {u.name for u in store.load().values()}
        for _ in range(50):  # the server reloads its users on the signal, a moment later
            try:
                late = await SandboxClient.connect(config.nats_url, user=raw_creds.user, password=raw_creds.password)
            except SandboxError:
                break
            closing = time.monotonic()
            await late.close()  # bounded, also when the server drops the user while it closes
            assert time.monotonic() - closing < CLOSE_WAIT + 1.0
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the server still lets host-b's removed worker user in after 5 s")
    finally:
        await raw.nc.close()
        await writer.close()
        await other.stop()
        await plane.stop()
