"""The driver contract, run against every engine: the same behaviour on real
podman, real docker and real QEMU microVMs (the vm driver), through the services
and through the driver itself.

Everything here that happens "by hand" uses the engine's own command line,
behind sandboxctl's back, the way an operator or a crash would; for vm, the VM
itself (tests.vmengine.VMEngine: its qemu, its QMP socket, its directory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import re
import time
from collections.abc import Iterator

import pytest

from sandboxctl.bus.eventlog import decode_fact, publish_fact
from sandboxctl.bus.reading import history
from sandboxctl.client import SandboxClient
from sandboxctl.drivers.base import ContainerMissing, SandboxSpec
from sandboxctl.events import ContainerExited, Envelope, now, subjects
from sandboxctl.events.envelope import type_name
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, PodmanService, make_driver
from sandboxctl.statemachine import Phase
from tests.conftest import CLI, ENGINES, Engine, phase
from tests.vmengine import VMEngine

AnyEngine = Engine | VMEngine


@pytest.fixture(params=(*ENGINES, "vm"))
def engine(request: pytest.FixtureRequest, engines: dict[str, Engine], tmp_path) -> Iterator[AnyEngine]:
    """Every engine of the contract, vm too (here only: a VM boots in seconds under TCG). The VMs
    are the test's own, under its data directory; every qemu of them is killed after the test,
    however it ended."""
    if request.param != "vm":
        yield engines[request.param]
        return
    vm = VMEngine(tmp_path / "data" / "vm")
    try:
        yield vm
    finally:
        vm.close()


@pytest.fixture
def config(config: Config, request: pytest.FixtureRequest) -> Config:
    """The suite's plane, with the vm driver beside podman and docker when the test is vm's."""
    if "engine" not in request.fixturenames or request.getfixturevalue("engine").name != "vm":
        return config
    vm = dataclasses.replace(config, drivers=(*ENGINES, "vm"))
    assert vm.vm_dir == request.getfixturevalue("engine").directory
    return vm


async def test_workspace_survives_stop_and_start_and_delete_removes_it(
    cli: CLI, names, image: str, engine: AnyEngine
) -> None:
    name = names.new()
    code, out, err = await cli("create", name, "--image", image, "--label", "team=a", "--driver", engine.name)
    assert code == 0, err
    assert await phase(cli, name) == "Ready"
    engine("exec", f"sandboxctl-{name}", "sh", "-c", "echo 'agent work' > /workspace/notes.txt")

    code, _, err = await cli("stop", name)
    assert code == 0, err
    assert await phase(cli, name) == "Stopped"
    state = engine.state(name)
    assert state["Running"] is False and state["Status"] == "exited"
    assert engine.volume_exists(name)

    code, _, err = await cli("start", name)
    assert code == 0, err
    assert await phase(cli, name) == "Ready"
    assert engine.state(name)["Running"] is True
    assert engine("exec", f"sandboxctl-{name}", "cat", "/workspace/notes.txt").stdout == "agent work\n"

    code, _, err = await cli("delete", name)
    assert code == 0, err
    assert not engine.container_exists(name)
    assert not engine.volume_exists(name)
    assert await phase(cli, name) == "Deleted"

    code, out, _ = await cli("history", name, "-o", "json")
    types = [e["type"].split(".")[2] for e in json.loads(out)]
    assert types == [
        "created",
        "ready",
        "stop_requested",
        "stopped",
        "start_requested",
        "ready",
        "delete_requested",
        "deleted",
    ]


async def test_kill_from_outside_is_error_not_stopped_and_start_recovers(
    cli: CLI, client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    name = names.new()
    assert (await cli("create", name, "--image", image))[0] == 0
    engine("kill", f"sandboxctl-{name}")
    item = await client.wait_for(name, "Error", timeout=2)
    assert "137" in item["last_error"]
    code, _, err = await cli("start", name)
    assert code == 0, err
    assert await phase(cli, name) == "Ready"
    assert engine.state(name)["Running"] is True


async def test_stop_on_stopped_succeeds_and_appends_nothing(
    cli: CLI, client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    assert (await cli("stop", name))[0] == 0
    before = await client.history(name)
    reply = await client.stop(name)
    assert reply.accepted and reply.appended == 0 and reply.phase == "Stopped"
    code, _, err = await cli("stop", name)
    assert code == 0, err
    await asyncio.sleep(0.2)
    assert await client.history(name) == before


async def test_stop_all_stops_every_ready_sandbox(
    cli: CLI, client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    made = [names.new() for _ in range(4)]
    await asyncio.gather(*(client.create(n, image) for n in made))
    await asyncio.gather(*(client.wait_for(n, "Ready") for n in made))
    await client.stop(made[0])
    await client.wait_for(made[0], "Stopped")
    code, out, err = await cli("stop", "--all")
    assert code == 0, err
    for n in made:
        assert await phase(cli, n) == "Stopped"
        assert engine.state(n)["Running"] is False
    code, out, _ = await cli("list", "-o", "json", "--phase", "Ready")
    assert json.loads(out) == []


async def test_get_json_and_list_filters(cli: CLI, client: SandboxClient, names, image: str, engine: AnyEngine) -> None:
    a, b = names.new(), names.new()
    await client.create(a, image, labels={"team": "red"})
    await client.create(b, image, labels={"team": "blue"})
    await client.wait_for(a, "Ready")
    await client.wait_for(b, "Ready")
    code, out, _ = await cli("get", a, "-o", "json")
    item = json.loads(out)
    assert (
        code == 0 and item["phase"] == "Ready" and item["labels"] == {"team": "red"} and item["driver"] == engine.name
    )
    assert item["image"] == image and item["last_seq"] > 0 and item["created_at"]
    code, out, _ = await cli("list", "-o", "json", "--label", "team=blue")
    assert [s["name"] for s in json.loads(out)] == [b]
    code, out, _ = await cli("list", "-o", "yaml")
    assert f"name: {a}" in out and "phase: Ready" in out
    code, out, _ = await cli("list")
    assert out.splitlines()[0].split()[:2] == ["NAME", "PHASE"]


async def test_a_start_by_hand_on_a_stopped_sandbox_makes_it_ready(
    client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    engine("start", f"sandboxctl-{name}")
    item = await client.wait_for(name, "Ready", reply.seq + 1, timeout=15)
    assert item["last_error"] == ""


def _instant(stamp: str) -> float:
    """An engine's RFC 3339 time (nanoseconds, Z or an offset) as seconds since the epoch."""
    found = re.fullmatch(r"(\S+?T[\d:]+)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp.strip())
    assert found, stamp
    whole = datetime.datetime.fromisoformat(found[1] + ("+00:00" if found[3] == "Z" else found[3]))
    return whole.timestamp() + float("0." + (found[2] or "0"))


async def test_the_container_made_is_reported_before_it_starts(
    client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    """ContainerCreated is in the facts stream while the container (or VM) starts, not once it has
    started: the state machine has taken it by the time the start is reported. (It is sent beside
    the start, so it is held to the first half of the start, not to before it.)"""
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    js = client.nc.jetstream()
    sub = await js.subscribe(subjects.facts_of(name), ordered_consumer=True)
    try:
        stored: dict[str, float] = {}
        reported = 0.0
        while "ContainerCreated" not in stored or "ContainerStarted" not in stored:
            msg = await sub.next_msg(timeout=10)
            fact = decode_fact(msg.data)
            kind = type(fact.data).__name__
            stored.setdefault(kind, msg.metadata.timestamp.timestamp())
            if kind == "ContainerStarted":
                reported = reported or fact.time.timestamp()
    finally:
        await sub.unsubscribe()
    inspected = json.loads(engine("container", "inspect", f"sandboxctl-{name}").stdout)[0]["State"]
    started_at = _instant(inspected["StartedAt"])
    assert started_at < reported, (inspected["StartedAt"], reported)
    assert stored["ContainerCreated"] < started_at + (reported - started_at) / 2, (stored, inspected["StartedAt"])


async def test_removal_by_hand_of_a_stopped_sandbox_is_backend_missing(
    client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    engine("rm", "-f", f"sandboxctl-{name}")
    item = await client.wait_for(name, "Error", timeout=5)
    assert item["last_error"] == "backend_missing"
    assert engine.volume_exists(name)  # the workspace is the user's; only delete removes it


async def test_a_stale_exit_from_an_earlier_run_leaves_the_new_run_ready(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    old = plane.statemachine.states[name]
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    reply = await client.start(name)
    await client.wait_for(name, "Ready", reply.seq)
    new = plane.statemachine.states[name]
    assert new.phase is Phase.READY and new.incarnation != old.incarnation
    # The exit of run N, delivered late (after run N+1 started), under an id never seen.
    stale = ContainerExited(exit_code=137, sandbox_id=old.sandbox_id, incarnation=old.incarnation)
    js = plane.statemachine.js
    ack = await publish_fact(
        js,
        Envelope(
            id=f"late-{name}", type=type_name(ContainerExited), source="test", subject=name, time=now(), data=stale
        ),
        new.host,  # as its host's worker
    )
    await _until_consumed(plane, ack.seq)
    # Read where the fence acts, not the projection (which may lag behind the fact's ack): once the
    # state machine has acknowledged the fact, the log holds whatever it decided, and its state too.
    after = await history(js, name, after=new.seq)
    assert [h["type"] for h in after if h["phase"] != "Ready"] == [], after  # no failed, nothing moved
    now_state = plane.statemachine.states[name]
    assert (now_state.phase, now_state.incarnation, now_state.last_error) == (Phase.READY, new.incarnation, "")
    assert engine.state(name)["Running"] is True


async def _until_consumed(plane: ControlPlane, facts_seq: int, timeout: float = 5.0) -> None:
    js = plane.statemachine.js
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(subjects.FACTS_STREAM, "sandboxctl-statemachine")
        if info.ack_floor.stream_seq >= facts_seq:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fact {facts_seq} was not consumed within {timeout}s")


async def test_reconciliation_after_changes_made_while_everything_was_down(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    stopped_by_hand, killed, removed, started_by_hand, stuck_stopping = (names.new(k) for k in "skrbt")
    made = [stopped_by_hand, killed, removed, started_by_hand, stuck_stopping]
    job = names.new("j")  # a job that ends, with exit 0, while nothing watches
    await asyncio.gather(*(client.create(n, image) for n in made))
    await client.create(job, image, ["sh", "-c", "while [ ! -f /workspace/go ]; do sleep 0.1; done"])
    made.append(job)
    await asyncio.gather(*(client.wait_for(n, "Ready") for n in made))
    reply = await client.stop(started_by_hand)
    await client.wait_for(started_by_hand, "Stopped", reply.seq)
    # A stop the driver worker never got to: it is in the log, and nobody acts on it.
    await plane.workers[[w.driver.name for w in plane.workers].index(engine.name)].stop()
    await client.stop(stuck_stopping)
    seen = {n: (await client.get(n))["last_seq"] for n in made}
    await plane.stop()

    # A grace its command's exit fits in: a VM's guest also unmounts and powers off (GUEST_TERM + 2 s).
    engine("stop", "-t", "5" if engine.name == "vm" else "1", f"sandboxctl-{stopped_by_hand}")
    engine("kill", f"sandboxctl-{killed}")
    engine("rm", "-f", f"sandboxctl-{removed}")
    engine("start", f"sandboxctl-{started_by_hand}")
    if engine.name == "vm":
        # A VM's guest powers off the moment its command ends, and an exec still answering goes
        # with it: the file that ends the job comes a moment after this exec has answered.
        engine("exec", f"sandboxctl-{job}", "sh", "-c", "(sleep 1; touch /workspace/go) >/dev/null 2>&1 &")
    else:
        engine("exec", f"sandboxctl-{job}", "touch", "/workspace/go")
    assert engine("wait", f"sandboxctl-{job}").stdout.strip() == "0"

    again = await ControlPlane(config).start()
    try:
        expected = {
            # Its main process exits 0 on SIGTERM (the test image's does): the engine says only
            # that it ended with 0, not who asked, so it reads as a job done, like kubectl's Completed.
            stopped_by_hand: "Completed",
            killed: "Ready",  # exited 137 while unobserved: restarted (the default)
            removed: "Error",
            started_by_hand: "Ready",
            stuck_stopping: "Stopped",
            job: "Completed",  # exited 0 on its own: a job done, not restarted
        }
        settle = 60 if engine.name == "vm" else 5  # the killed one is started again: a VM boots in seconds
        items = await asyncio.gather(*(client.wait_for(n, p, seen[n] + 1, timeout=settle) for n, p in expected.items()))
        assert items[2]["last_error"] == "backend_missing"
        for n, p in expected.items():
            if n != removed:
                assert engine.state(n)["Running"] is (p == "Ready")
        assert all(engine.volume_exists(n) for n in made)
    finally:
        await again.stop()


async def test_reconciliation_can_mark_unobserved_exits_as_errors(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    await plane.stop()
    engine("kill", f"sandboxctl-{name}")
    config.reconcile_exited = "error"
    again = await ControlPlane(config).start()
    try:
        item = await client.wait_for(name, "Error", timeout=5)
        assert "137" in item["last_error"]
        assert engine.state(name)["Running"] is False
    finally:
        await again.stop()


async def test_an_orphan_container_is_reported_and_left_alone(
    plane: ControlPlane, names, image: str, engine: AnyEngine
) -> None:
    name = names.new("orphan")
    engine(
        "create", "--name", f"sandboxctl-{name}", "--network", "none",
        "--label", "sandboxctl.managed=true", "--label", f"sandboxctl.sandbox={name}",
        "--label", "sandboxctl.sandbox_id=nobody", image,
    )  # fmt: skip
    worker = plane.workers[[w.driver.name for w in plane.workers].index(engine.name)]
    await worker.reconcile()
    js = plane.statemachine.js
    msg = await js.get_last_msg(subjects.FACTS_STREAM, subjects.fact(name, worker.host))
    fact = decode_fact(msg.data).data
    assert type(fact).__name__ == "ContainerOrphaned" and fact.sandbox_id == "nobody"
    assert engine.container_exists(name)


async def test_a_container_whose_sandbox_label_is_no_name_is_passed_by_and_stops_nothing(
    plane: ControlPlane, client: SandboxClient, names, image: str, engine: AnyEngine
) -> None:
    """The label is the engine's word, which anyone may write: a container labelled with what is no
    sandbox name (no subject of the facts stream) is neither reported nor waited on, and the
    watcher goes on reporting what happens to real sandboxes."""
    bad = names.new("bad")
    engine(
        "create", "--name", f"sandboxctl-{bad}", "--network", "none",
        "--label", "sandboxctl.managed=true", "--label", f"sandboxctl.sandbox={bad}.x",
        "--label", "sandboxctl.sandbox_id=nobody", image,
    )  # fmt: skip
    worker = plane.workers[[w.driver.name for w in plane.workers].index(engine.name)]
    await asyncio.wait_for(worker.reconcile(), 30)
    engine("start", f"sandboxctl-{bad}")  # an engine event of it, for the watcher
    name = names.new()
    await client.create(name, image, driver=engine.name)
    await client.wait_for(name, "Ready", timeout=30)
    engine("kill", f"sandboxctl-{name}")
    await client.wait_for(name, "Error", timeout=10)  # reported by the watcher, which was not held up


@pytest.mark.parametrize("engine", ENGINES, indirect=True)  # vm's counterpart: the test after this one
async def test_an_unreachable_engine_gives_error_with_its_message_and_never_sticks_in_stopping(
    config: Config, plane: ControlPlane, client: SandboxClient, names, image: str, engine: AnyEngine, tmp_path
) -> None:
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    await plane.stop()
    real = config.podman_url, config.docker_url
    dead = f"unix://{tmp_path / 'no-engine.sock'}"
    if engine.name == "podman":
        config.podman_url = dead
    else:
        config.docker_url = dead
    down = await ControlPlane(config).start()
    try:
        began = time.monotonic()
        reply = await client.stop(name)
        item = await client.wait_for(name, "Error", reply.seq, timeout=10)
        assert time.monotonic() - began < 10
        assert item["last_error"].startswith("stop failed: ") and len(item["last_error"]) > len("stop failed: ")
        created = await client.create(names.new(), image)
        assert (await client.wait_for(created.sandbox, "Error", timeout=10))["last_error"].startswith("create failed")
    finally:
        await down.stop()
    # With the engine back, reconciliation sees the container still running: Ready again.
    config.podman_url, config.docker_url = real
    back = await ControlPlane(config).start()
    try:
        await client.wait_for(name, "Ready", item["last_seq"] + 1, timeout=5)
    finally:
        await back.stop()


@pytest.mark.parametrize("engine", ["vm"], indirect=True)
@pytest.mark.parametrize("missing", ["qemu", "guest"])
async def test_a_vm_host_without_qemu_or_its_guest_gives_error_with_a_clear_message_and_never_sticks_in_stopping(
    config: Config,
    plane: ControlPlane,
    client: SandboxClient,
    names,
    image: str,
    engine: AnyEngine,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
    missing: str,
) -> None:
    """vm's unreachable engine: qemu (SANDBOXCTL_QEMU naming none) or the guest kernel gone. A VM
    that runs is stopped all the same (through its own QMP socket: it needs neither); what needs
    them, a boot, fails with DriverFailed saying what is missing and how to install it."""
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    await plane.stop()
    if missing == "qemu":
        monkeypatch.setenv("SANDBOXCTL_QEMU", str(tmp_path / "no-qemu"))
        what = "qemu-system-x86_64 is not installed"
    else:
        config.vm_guest_dir = tmp_path / "no-guest"
        what = f"no VM guest kernel in {tmp_path / 'no-guest'}"
    down = await ControlPlane(config).start()
    try:
        began = time.monotonic()
        reply = await client.stop(name)
        await client.wait_for(name, "Stopped", reply.seq, timeout=10)
        assert time.monotonic() - began < 10
        reply = await client.start(name)
        item = await client.wait_for(name, "Error", reply.seq, timeout=10)
        assert item["last_error"].startswith(f"start failed: {what}"), item["last_error"]
        assert item["last_error"].endswith("run scripts/setup-vm.sh"), item["last_error"]
        created = await client.create(names.new(), image)
        failed = await client.wait_for(created.sandbox, "Error", timeout=10)
        assert failed["last_error"].startswith(f"start failed: {what}"), failed["last_error"]
        facts = [h for h in await client.history(created.sandbox) if h["type"].split(".")[2] == "failed"]
        assert facts, await client.history(created.sandbox)
    finally:
        await down.stop()
    # With qemu and the guest back, the sandbox starts again.
    monkeypatch.delenv("SANDBOXCTL_QEMU", raising=False)
    config.vm_guest_dir = None
    back = await ControlPlane(config).start()
    try:
        reply = await client.start(name)
        await client.wait_for(name, "Ready", reply.seq, timeout=60)
        assert engine.state(name)["Running"] is True
    finally:
        await back.stop()


# -- the driver itself -------------------------------------------------------------


@pytest.fixture
def driver(engine: AnyEngine, config: Config):
    driver = make_driver(engine.name, config)
    yield driver
    driver.close()


def test_resume_semantics(driver, names, image: str, engine: AnyEngine) -> None:
    name = names.new()
    with pytest.raises(ContainerMissing):
        driver.start(name, "sb-1")  # resuming a missing container reports that it is missing
    info = driver.create(SandboxSpec(name=name, sandbox_id="sb-1", image=image, labels={"team": "x"}))
    assert not info.running and info.sandbox_id == "sb-1" and info.sandbox == name
    assert driver.create(SandboxSpec(name=name, sandbox_id="sb-1", image=image)).container_id == info.container_id
    launches: list[tuple[bool, bool]] = []  # at each call of launched: (the VM runs, its guest is ready)

    def launched() -> None:
        if isinstance(engine, VMEngine):
            directory = engine.find(name)
            assert directory is not None
            machine = engine.machine(directory)
            launches.append((machine.pid() is not None, machine.ready()))
        else:
            launches.append((True, False))  # the start call is about to be made

    first = driver.start(name, "sb-1", launched=launched)
    assert first.running and first.incarnation
    # once: a VM once its qemu runs, seconds before its guest is ready; a container as it is started
    assert launches == [(True, False)]
    assert driver.start(name, "sb-1").incarnation == first.incarnation  # resuming a running container is a no-op
    stopped = driver.stop(name, "sb-1", 5)
    assert not stopped.running and driver.stop(name, "sb-1", 5).running is False  # stopping twice is fine
    again = driver.start(name, "sb-1")  # resuming a stopped container starts it
    assert again.running and again.incarnation != first.incarnation
    if isinstance(engine, VMEngine):  # the VM's record names its sandbox; its workspace disk is /workspace
        record = engine.record(name)
        assert (record["sandbox"], record["sandbox_id"], record["labels"]) == (name, "sb-1", {"team": "x"})
        find = 'disk=$(findfs LABEL=workspace) && grep "^$disk " /proc/mounts'
        mounted = engine("exec", f"sandboxctl-{name}", "sh", "-c", find).stdout
        assert mounted.split()[1:3] == ["/workspace", "ext4"] and engine.volume_exists(name), mounted
    else:
        labels = json.loads(engine("container", "inspect", f"sandboxctl-{name}").stdout)[0]["Config"]["Labels"]
        assert labels["sandboxctl.sandbox"] == name and labels["sandboxctl.sandbox_id"] == "sb-1"
        assert labels["team"] == "x"
        mounts = json.loads(engine("container", "inspect", f"sandboxctl-{name}").stdout)[0]["Mounts"]
        assert [(m["Name"], m["Destination"]) for m in mounts] == [(f"sandboxctl-{name}-workspace", "/workspace")]
    assert [i.sandbox for i in driver.list_managed() if i.sandbox == name] == [name]
    driver.delete(name, "sb-1")
    assert driver.inspect(name, "sb-1") is None and not engine.volume_exists(name)
    driver.delete(name, "sb-1")  # deleting what is gone succeeds
    with pytest.raises(ContainerMissing):
        driver.stop(name, "sb-1", 1)


def test_a_container_of_another_sandbox_id_is_not_taken_over(driver, names, image: str) -> None:
    name = names.new()
    driver.create(SandboxSpec(name=name, sandbox_id="first", image=image))
    with pytest.raises(Exception, match="belongs to sandbox id first"):
        driver.create(SandboxSpec(name=name, sandbox_id="second", image=image))


async def test_a_watcher_that_loses_its_stream_re_lists_and_misses_nothing(
    tmp_path, config: Config, nats_server, names, image: str, engines
) -> None:
    # A podman service of this test's own, so it can go away while podman itself
    # (and the containers) stay: what changes meanwhile is seen by no stream.
    service = PodmanService(tmp_path / "own-podman.sock").start()
    config.podman_url = service.url
    config.reconcile_exited = "error"
    plane = await ControlPlane(config).start()
    client = await SandboxClient.connect(config.nats_url, actor="test")
    podman = engines["podman"]
    try:
        crashed, vanished = names.new("c"), names.new("v")
        for n in (crashed, vanished):
            await client.create(n, image, driver="podman")
            await client.wait_for(n, "Ready")
        worker = plane.workers[[w.driver.name for w in plane.workers].index("podman")]
        sweeps = worker.reconciliations
        service.stop()
        podman("kill", f"sandboxctl-{crashed}")
        podman("rm", "-f", f"sandboxctl-{vanished}")
        await asyncio.sleep(1.5)  # the watcher notices the loss and retries
        service.start()
        assert (await client.wait_for(crashed, "Error", timeout=10))["last_error"].startswith(
            "container exited with code 137"
        )
        assert (await client.wait_for(vanished, "Error", timeout=10))["last_error"] == "backend_missing"
        for _ in range(200):  # the sweep counts itself done once it has also reported the orphans
            if worker.reconciliations > sweeps:
                break
            await asyncio.sleep(0.05)
        assert worker.reconciliations > sweeps
    finally:
        await client.close()
        await plane.stop()
        service.stop()
