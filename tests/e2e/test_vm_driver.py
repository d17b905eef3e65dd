"""VM sandboxes through the whole control plane: real qemu microVMs (scripts/setup-vm.sh), a real
nats-server, the vm driver worker. What holds for containers holds here: stop keeps the
workspace disk, start brings the same sandbox back, a VM killed from outside is Error, only
delete removes the workspace, and bad input is an Error with its reason that deletes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandboxctl.cli import attach
from sandboxctl.client import SandboxClient
from sandboxctl.client.errors import InvalidArgument
from sandboxctl.drivers.base import DriverError, SandboxSpec
from sandboxctl.drivers.vm import disks
from sandboxctl.drivers.vm.driver import VMDriver
from sandboxctl.drivers.vm.machine import Guest, Machine, default_guest_dir
from sandboxctl.events.envelope import new_id
from sandboxctl.events.facts import ContainerCreated
from sandboxctl.events.spec import Resources
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, make_driver
from tests.conftest import CLI, cli_process, phase
from tests.logview import facts_of
from tests.vmengine import qemu_pids


@pytest.fixture
def vm_config(config: Config, tmp_path: Path) -> Iterator[Config]:
    """A plane driving VMs alone; every qemu the test started is killed after it."""
    # The reaper's warning gives a short grace here, so an idle VM is stopped within the test.
    vm = dataclasses.replace(config, drivers=("vm",), default_driver="vm", idle_grace=1.0, reaper_interval=0.1)
    yield vm
    for pid in qemu_pids(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
async def vm_plane(vm_config: Config) -> AsyncIterator[ControlPlane]:
    plane = await ControlPlane(vm_config).start()
    yield plane
    await plane.stop()


@pytest.fixture
async def vm_client(vm_config: Config, vm_plane: ControlPlane) -> AsyncIterator[SandboxClient]:
    client = await SandboxClient.connect(vm_config.nats_url, actor="test")
    yield client
    await client.close()


@pytest.fixture
def vm_cli(vm_config: Config, vm_plane: ControlPlane, capsys: pytest.CaptureFixture[str]) -> CLI:
    return CLI(vm_config, capsys)


async def until_spares(directory: Path, count: int) -> dict[str, int]:
    """The spare disks in ``directory`` by name, with their inodes, once there are ``count``."""

    def look() -> dict[str, int]:
        return {p.name: p.stat().st_ino for p in directory.glob("*.ext4")} if directory.exists() else {}

    for _ in range(300):
        found = await asyncio.to_thread(look)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{directory} holds {len(found)} spare disks after 30 s, not {count}")


def read_some(fd: int) -> bytes:
    """What the terminal has within a moment (b"" if nothing): never blocks for long, so no
    thread is left reading once the test is over."""
    if select.select([fd], [], [], 0.5)[0]:
        return os.read(fd, 4096)
    return b""


def damage(disk: Path) -> None:
    """Overwrite the disk's superblock and its first backups: beyond what e2fsck -p mends."""
    with open(disk, "r+b") as f:
        f.write(b"\xff" * (4 << 20))


def vm_dir(config: Config, item: dict[str, object]) -> Path:
    return config.vm_dir / "sandboxes" / str(item["sandbox_id"])


def vm_pid(config: Config, item: dict[str, object]) -> int:
    pids = qemu_pids(vm_dir(config, item))
    assert len(pids) == 1, pids
    return pids[0]


async def test_a_vm_sandbox_keeps_its_workspace_across_stop_and_start_and_delete_removes_it(
    vm_config: Config, vm_cli: CLI, vm_client: SandboxClient, names, image: str
) -> None:
    name = names.new("vm")
    idle = "trap 'exit 0' TERM; while :; do echo tick; sleep 1 & wait $!; done"
    # The driver makes blank disks ahead, and a create takes its own from them: no mkfs to wait for.
    spares = await until_spares(vm_config.vm_dir / "spares", 2 * disks.SPARES)
    code, _, err = await vm_cli(
        "create", name, "--driver", "vm", "--image", image, "--memory", "256m", "--env", "GREETING=hi",
        "--", "sh", "-c", idle,
    )  # fmt: skip
    assert code == 0, err
    item = await vm_client.wait_for(name, "Ready", timeout=90)
    assert item["driver"] == "vm"
    code, out, err = await vm_cli("get", name, "-o", "json")
    assert code == 0 and json.loads(out)["acceleration"] in ("kvm", "tcg"), err
    directory = vm_dir(vm_config, item)
    assert (directory / "workspace.img").stat().st_ino in spares.values()
    assert (directory / "layer.img").stat().st_ino in spares.values()
    again = await until_spares(vm_config.vm_dir / "spares", 2 * disks.SPARES)
    assert len(set(again) - set(spares)) == 2  # the two taken are made again
    # The create's ContainerCreated is reported once qemu runs, while the guest boots (qemu's
    # launch is not kept waiting on the report): after the boot's record, written just before it.
    launched_at = json.loads((directory / "boot.json").read_text())["time"]
    facts = await facts_of(vm_client.nc.jetstream(), name)
    created = [envelope.time.timestamp() for _, envelope in facts if isinstance(envelope.data, ContainerCreated)]
    assert len(created) == 1 and created[0] > launched_at, (created, launched_at)
    code, out, err = await vm_cli(
        "exec", name, "--", "sh", "-c", 'echo agent work > /workspace/notes.txt; echo "$GREETING $PATH"; uname -r'
    )
    assert code == 0, err
    environment, kernel = out.splitlines()
    assert environment == "hi /bin"  # the image's environment (PATH=/bin), the sandbox's over it
    assert "-cloud-" in kernel  # the guest's own kernel, not the host's container
    first = vm_pid(vm_config, item)
    # logs --follow prints what the command writes as it writes it, and ends when the VM stops.
    seen: list[bytes] = []
    follow = asyncio.create_task(
        attach.show_logs(vm_client, vm_config, name, tail=0, follow=True, output=lambda _fd, chunk: seen.append(chunk))
    )
    try:
        for _ in range(100):
            if b"".join(seen).count(b"tick") >= 2:
                break
            await asyncio.sleep(0.1)
        assert b"".join(seen).count(b"tick") >= 2 and b"sandboxctl-ready" not in b"".join(seen), seen
        reply = await vm_client.stop(name)
        await vm_client.wait_for(name, "Stopped", reply.seq, timeout=60)
        await asyncio.wait_for(follow, 15)
    finally:
        follow.cancel()
    assert qemu_pids(directory) == []  # powered off: no CPU, no memory held
    assert (directory / "workspace.img").exists()
    check = await asyncio.to_thread(
        subprocess.run, ["e2fsck", "-fn", str(directory / "workspace.img")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr  # unmounted cleanly by the guest

    reply = await vm_client.start(name)
    await vm_client.wait_for(name, "Ready", reply.seq, timeout=90)
    assert vm_pid(vm_config, item) != first
    code, out, err = await vm_cli("exec", name, "--", "cat", "/workspace/notes.txt")
    assert (code, out) == (0, "agent work\n"), err
    code, out, err = await vm_cli("logs", name)
    assert code == 0 and out, err  # the serial console is the log

    reply = await vm_client.delete(name)
    await vm_client.wait_for(name, "Deleted", reply.seq, timeout=60)
    assert not directory.exists() and qemu_pids(directory) == []
    assert set(await until_spares(vm_config.vm_dir / "spares", 2 * disks.SPARES)) == set(again)  # no sandbox's
    moves = ("created", "ready", "stop_requested", "stopped", "start_requested", "delete_requested", "deleted")
    types = [t for h in await vm_client.history(name) if (t := h["type"].split(".")[2]) in moves]  # not the leases
    assert types == [
        "created", "ready", "stop_requested", "stopped", "start_requested", "ready", "delete_requested", "deleted",
    ]  # fmt: skip


async def test_a_vm_killed_from_outside_is_error_within_2s_and_start_recovers_it(
    vm_config: Config, vm_cli: CLI, vm_client: SandboxClient, names, image: str
) -> None:
    name = names.new("vmk")
    await vm_client.create(name, image, driver="vm")
    item = await vm_client.wait_for(name, "Ready", timeout=90)
    os.kill(vm_pid(vm_config, item), signal.SIGKILL)
    began = time.monotonic()
    failed = await vm_client.wait_for(name, "Error", timeout=5)
    assert time.monotonic() - began < 2.0
    assert "137" in failed["last_error"]
    reply = await vm_client.start(name)
    await vm_client.wait_for(name, "Ready", reply.seq, timeout=90)
    # paused (memory kept, no CPU), resumed, paused again: a stop powers off a paused guest too
    reply = await vm_client.pause(name)
    await vm_client.wait_for(name, "Paused", reply.seq, timeout=30)
    reply = await vm_client.resume(name)
    item = await vm_client.wait_for(name, "Ready", reply.seq, timeout=30)
    # paused and resumed behind sandboxctl's back, straight through QMP: the phase follows qemu
    # (its STOP and RESUME events), not the next reconciliation
    outside = Machine(vm_dir(vm_config, item), Guest.find(default_guest_dir()))
    await asyncio.to_thread(outside.pause)
    item = await vm_client.wait_for(name, "Paused", item["last_seq"], timeout=3)
    await asyncio.to_thread(outside.resume)
    item = await vm_client.wait_for(name, "Ready", item["last_seq"], timeout=3)
    reply = await vm_client.pause(name)
    await vm_client.wait_for(name, "Paused", reply.seq, timeout=30)
    # exec of a Stopped VM sandbox starts it first, as with containers
    reply = await vm_client.stop(name)
    await vm_client.wait_for(name, "Stopped", reply.seq, timeout=60)
    code, out, err = await vm_cli("exec", name, "--", "sh", "-c", "echo back; exit 3")
    assert (code, out) == (3, "back\n"), err
    assert await phase(vm_cli, name) == "Ready"


async def test_too_little_memory_is_an_error_with_its_reason_and_a_damaged_workspace_is_never_deleted(
    vm_config: Config, vm_cli: CLI, vm_client: SandboxClient, names, image: str
) -> None:
    small = names.new("vms")
    with pytest.raises(InvalidArgument, match="below the 96 MiB a vm sandbox's guest needs"):
        await vm_client.create(small, image, driver="vm", resources=Resources(memory=32 << 20))
    code, _, err = await vm_cli("create", small, "--driver", "vm", "--image", image, "--memory", "64m")
    assert code != 0 and "invalid_argument" in err and "96 MiB" in err, err

    name = names.new("vmd")
    await vm_client.create(name, image, driver="vm")
    item = await vm_client.wait_for(name, "Ready", timeout=90)
    reply = await vm_client.stop(name)
    await vm_client.wait_for(name, "Stopped", reply.seq, timeout=60)
    disk = vm_dir(vm_config, item) / "workspace.img"
    size = disk.stat().st_size
    await asyncio.to_thread(damage, disk)
    reply = await vm_client.start(name)
    failed = await vm_client.wait_for(name, "Error", reply.seq, timeout=60)
    assert "workspace disk" in failed["last_error"] and "e2fsck" in failed["last_error"], failed["last_error"]
    assert disk.exists() and disk.stat().st_size == size  # the user's files are never remade


async def test_the_reaper_stops_an_idle_vm_and_a_worker_that_comes_back_restarts_one_that_died_unwatched(
    vm_config: Config, vm_plane: ControlPlane, vm_client: SandboxClient, vm_cli: CLI, names, image: str
) -> None:
    # Idleness, leases and holds work on vm unchanged: a leased VM is not stopped past its idle
    # timeout; released, it is; a stop hold keeps it stopped.
    idle = names.new("vmi")
    await vm_client.create(idle, image, driver="vm", idle_timeout=2.0)
    await vm_client.wait_for(idle, "Ready", timeout=90)
    code, _, err = await vm_cli("lease", "acquire", idle, "--ttl", "1m", "--holder", "agent-7")
    assert code == 0, err
    await asyncio.sleep(2.0 + vm_config.idle_grace + 2.0)
    assert (await vm_client.get(idle))["phase"] == "Ready"
    code, _, err = await vm_cli("lease", "release", idle, "--holder", "agent-7")
    assert code == 0, err
    item = await vm_client.wait_for(idle, "Stopped", timeout=60)
    assert qemu_pids(vm_dir(vm_config, item)) == []
    code, _, err = await vm_cli("hold", idle, "--holder", "ops-7", "--reason", "disk audit")
    assert code == 0, err
    code, _, err = await vm_cli("start", idle)
    assert code == 5 and "ops-7" in err, err

    name = names.new("vmu")
    await vm_client.create(name, image, driver="vm")
    item = await vm_client.wait_for(name, "Ready", timeout=90)
    seen = item["last_seq"]
    await vm_plane.stop()
    os.kill(vm_pid(vm_config, item), signal.SIGKILL)
    await asyncio.sleep(0.5)
    again = await ControlPlane(vm_config).start()
    try:
        back = await vm_client.wait_for(name, "Ready", int(seen) + 1, timeout=90)
        assert back["last_error"] == ""
        assert qemu_pids(vm_dir(vm_config, item))  # restarted: it exited 137 while nobody watched
    finally:
        await again.stop()


async def test_shell_on_a_vm_sandbox_with_a_terminal_and_from_a_pipe(
    vm_config: Config, vm_client: SandboxClient, names, image: str
) -> None:
    name = names.new("vmsh")
    await vm_client.create(name, image, driver="vm")
    await vm_client.wait_for(name, "Ready", timeout=90)
    env = {
        **os.environ,
        "SANDBOXCTL_NATS_URL": vm_config.nats_url,
        "SANDBOXCTL_DATA_DIR": str(vm_config.data_dir),
        "SANDBOXCTL_DRIVERS": "vm",
    }
    # From a pipe: the input is the command's standard input, as for exec.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "shell", name,
        env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out_b, err_b = await asyncio.wait_for(proc.communicate(b"echo from a pipe; exit 4\n"), 60)
    assert proc.returncode == 4 and b"from a pipe" in out_b, err_b.decode()

    # An exec the caller gives up on (a signal) ends its command in the guest too.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "exec", name, "--", "sh", "-c", "echo started; sleep 300",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"started\n"
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 30)
    code, out, err = await cli_process(env, "exec", name, "--", "ps")
    assert code == 0 and "sleep 300" not in out, out + err

    # With a terminal: the guest's console is the command's terminal, relayed both ways.
    leader, follower = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "shell", name,
        env=env, stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    seen = b""

    async def until_seen(what: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while what not in seen:
            assert time.monotonic() < deadline, f"{what!r} not seen on the terminal: {seen[-500:]!r}"
            try:
                seen += await asyncio.to_thread(read_some, leader)
            except OSError:  # the command line ended and closed the terminal
                break

    try:
        await until_seen(b"# ")  # the guest shell's prompt
        os.write(leader, b"tty; echo $((6 * 7))\r")
        await until_seen(b"42")
        assert b"/dev/hvc" in seen  # a terminal of the guest's own
        seen = seen[seen.index(b"42") :]
        await until_seen(b"# ")  # the next prompt
        os.write(leader, b"exit 5\r")
        assert await asyncio.wait_for(proc.wait(), 30) == 5
        # The session's console serves the next exec (the first console a command is given).
        code, out, err = await cli_process(env, "exec", name, "--", "tty")
        assert (code, out) == (1, "not a tty\n"), err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(leader)


async def test_vm_sandboxes_show_the_hosts_acceleration(vm_cli: CLI) -> None:
    code, out, err = await vm_cli("hosts", "-o", "json")
    assert code == 0, err
    (host,) = json.loads(out)
    assert host["engines"] == ["vm"] and host["acceleration"] in ("kvm", "tcg")
    code, out, err = await vm_cli("hosts")
    assert code == 0 and f"vm ({host['acceleration']})" in out, err


async def test_only_the_workers_driver_makes_disks_ahead_and_a_plane_that_stops_ends_it(
    vm_config: Config, tmp_path: Path
) -> None:
    """The CLI makes a driver for each exec, logs or copy: it never makes disks ahead."""
    spares = vm_config.vm_dir / "spares"
    cli_driver = make_driver("vm", vm_config)
    try:
        await asyncio.sleep(disks.FILL_DELAY * 2)
        assert not spares.exists()
    finally:
        cli_driver.close()
    plane = await ControlPlane(vm_config).start()
    try:
        await until_spares(spares, 2 * disks.SPARES)  # the worker's driver makes them
    finally:
        await plane.stop()
    filler = plane.drivers["vm"]._spares._thread  # type: ignore[attr-defined]
    await asyncio.to_thread(filler.join, 10)
    assert not filler.is_alive()


def test_a_vms_disks_taken_ahead_are_made_durable_before_its_launch_is_told(
    vm_config: Config, image: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A create places its spare disks without waiting on the filesystem's sync; the start makes
    their names durable while qemu boots, before it tells anyone of the launch, and a start that
    fails before any launch makes them durable all the same."""
    driver = make_driver("vm", vm_config)
    assert isinstance(driver, VMDriver)
    made = disks.Spares(driver.spares_dir, disks.SPARES)
    made.fill()
    spares = {entry.stat().st_ino for entry in driver.spares_dir.glob("*.ext4")}
    told: list[tuple[str, Path | None]] = []
    sync = disks.sync_dir

    def synced(path: Path) -> None:
        told.append(("synced", Path(path)))
        sync(path)

    monkeypatch.setattr(disks, "sync_dir", synced)
    spec = SandboxSpec(name="durable", sandbox_id=new_id(), image=image)
    directory = driver.sandboxes_dir / spec.sandbox_id
    try:
        driver.create(spec)
        assert {(directory / n).stat().st_ino for n in ("workspace.img", "layer.img")} <= spares
        assert ("synced", directory) not in told  # not on the create's path
        told.clear()
        no_guest = VMDriver(driver.directory, guest_dir=tmp_path / "no-guest", spares=0)
        with pytest.raises(DriverError, match="no VM guest kernel"):
            no_guest.start(spec.name, spec.sandbox_id, launched=lambda: told.append(("launched", None)))
        assert told == [("synced", directory)]
        told.clear()
        driver.start(spec.name, spec.sandbox_id, launched=lambda: told.append(("launched", None)))
        assert ("synced", directory) in told[: told.index(("launched", None))], told
    finally:
        with contextlib.suppress(Exception):
            driver.delete(spec.name, spec.sandbox_id)
        driver.close()
