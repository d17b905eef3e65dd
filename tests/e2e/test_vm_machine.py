"""The vm driver's machine, on real QEMU (TCG) with the guest scripts/setup-vm.sh builds.

The disks are made here: a root filesystem of busybox-static and its applet links (mkfs.ext4 -d),
and an empty layer and workspace per test. Each test boots its own VM (about 3 s under TCG).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxctl.drivers.vm import accel, machine
from sandboxctl.drivers.vm.machine import NICE, Guest, Machine, MachineSpec, VMError

BUSYBOX = "/bin/busybox"


def mkfs(path: Path, label: str, content: Path | None = None) -> Path:
    path.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", "256M", str(path)], check=True)
    extra = ["-d", str(content)] if content else []
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, *extra, str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def root_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root filesystem holding only busybox, its applets linked in /bin."""
    base = tmp_path_factory.mktemp("vmroot")
    tree = base / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "tmp").mkdir()
    (tree / "etc").mkdir()
    shutil.copy(BUSYBOX, tree / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", tree / "bin" / applet)
    return mkfs(base / "root.img", "root", tree)


@pytest.fixture(scope="module")
def guest() -> Guest:
    return Guest.find(machine.default_guest_dir())


@pytest.fixture
def disks(tmp_path: Path, root_disk: Path) -> MachineSpec:
    return MachineSpec(
        root=root_disk,
        layer=mkfs(tmp_path / "layer.img", "layer"),
        workspace=mkfs(tmp_path / "workspace.img", "workspace"),
    )


@pytest.fixture
def vm(tmp_path: Path, guest: Guest) -> Iterator[Machine]:
    # Deeper than a unix socket's path can be: the machine must reach its sockets all the same.
    m = Machine(tmp_path / ("deep" * 16) / "vm", guest)
    yield m
    m.kill()


def run(m: Machine, *argv: str, stdin: bytes | None = None) -> tuple[int, bytes]:
    chunks: list[bytes] = []
    code = m.exec(argv, lambda fd, chunk: chunks.append(chunk), stdin=stdin)
    return code, b"".join(chunks)


def test_boot_exec_binary_and_two_at_once(vm: Machine, disks: MachineSpec) -> None:
    pid = vm.boot(disks)
    assert vm.pid() == pid
    assert (vm.directory.stat().st_mode & 0o777) == 0o700
    assert f"sandboxctl-ready {vm.started_at()}".encode() in vm.logs().read_bytes()
    # every thread of qemu (its vCPUs too) yields to the control plane
    tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert len(tasks) > 1 and {os.getpriority(os.PRIO_PROCESS, t) for t in tasks} == {NICE}

    assert run(vm, "sh", "-c", "echo hi; exit 3") == (3, b"hi\n")
    # Every byte value, no final newline, through stdin and back: the output is not line-bound.
    data = bytes(range(256)) * 64 + b"\n\n" + b"tail without newline"
    assert run(vm, "cat", stdin=data) == (0, data)
    assert run(vm, "sh", "-c", 'printf %s "$PWD"; echo oops >&2') == (0, b"/workspaceoops\n")
    assert run(vm, "no-such-command")[0] == 127

    # Output streams: the first line arrives while the command still runs.
    arrivals: list[tuple[float, bytes]] = []
    began = time.monotonic()
    vm.exec(["sh", "-c", "echo first; sleep 1.5; echo second"], lambda fd, c: arrivals.append((time.monotonic(), c)))
    assert b"".join(c for _, c in arrivals) == b"first\nsecond\n"
    assert arrivals[0][1].startswith(b"first") and arrivals[0][0] - began < 1.3

    results: list[tuple[int, bytes]] = []
    started = time.monotonic()
    threads = [
        threading.Thread(target=lambda n=n: results.append(run(vm, "sh", "-c", f"sleep 1.5; echo {n}")))
        for n in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(0, b"0\n"), (0, b"1\n")]
    assert time.monotonic() - started < 2.9  # side by side, not one after the other


def test_workspace_survives_powerdown_clean(vm: Machine, disks: MachineSpec) -> None:
    vm.boot(disks)
    first = vm.started_at()
    assert run(vm, "sh", "-c", "echo kept > /workspace/note; echo layer > /etc/mine")[0] == 0
    started = time.monotonic()
    vm.powerdown(grace=15)
    assert vm.pid() is None
    assert time.monotonic() - started < 10  # the guest took the power button; no QMP quit was needed
    check = subprocess.run(["e2fsck", "-fn", str(disks.workspace)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    layer = subprocess.run(["e2fsck", "-fn", str(disks.layer)], capture_output=True, text=True)
    assert layer.returncode == 0, layer.stdout + layer.stderr

    vm.boot(disks)
    assert vm.started_at() != first
    assert run(vm, "cat", "/workspace/note", "/etc/mine") == (0, b"kept\nlayer\n")
    vm.powerdown(grace=15)
    assert vm.pid() is None
    vm.powerdown(grace=1)  # not running: nothing to do


def test_command_exit_code_and_end(vm: Machine, disks: MachineSpec) -> None:
    spec = MachineSpec(
        root=disks.root,
        layer=disks.layer,
        workspace=disks.workspace,
        command=("sh", "-c", 'echo "said $GREETING in $PWD"; exit 5'),
        env=(("GREETING", "hello there"),),
    )
    vm.boot(spec)
    deadline = time.monotonic() + 20
    while vm.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm.pid() is None
    assert vm.exit_code() == 5
    assert b"said hello there in /workspace\n" in vm.logs().read_bytes()
    with pytest.raises(VMError, match="not running"):
        run(vm, "true")


def test_the_command_runs_when_ready_and_nothing_it_prints_passes_for_the_guests_lines(
    vm: Machine, disks: MachineSpec
) -> None:
    """Ready once the command is launched (its file is there when boot returns, and an exec is
    answered), and its output reaches the log only after the ready marker: a command that
    prints the guest's failure marker, or its ready marker, at once does not fail or fake the boot."""
    spec = MachineSpec(
        root=disks.root,
        layer=disks.layer,
        workspace=disks.workspace,
        command=(
            "sh",
            "-c",
            'echo "sandboxctl-fail pretended"; echo "sandboxctl-ready $(cat /proc/cmdline)"; '
            "touch /workspace/ran; sleep 3600",
        ),
    )
    vm.boot(spec)
    since = vm.logs().read_bytes()
    boot = vm.started_at().encode()
    ours = since.index(b"sandboxctl-ready " + boot + b"\n")
    assert since.rfind(b"sandboxctl-fail pretended") in (-1, *range(ours, len(since)))
    deadline = time.monotonic() + 20
    while b"sandboxctl-fail pretended" not in vm.logs().read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = vm.logs().read_bytes()
    assert ours < log.index(b"sandboxctl-fail pretended")  # passed on, after the marker
    code, _ = run(vm, "sh", "-c", "until [ -e /workspace/ran ]; do sleep 0.1; done")
    assert code == 0 and vm.pid() is not None


def test_watch_sees_events_and_a_kill_at_once(vm: Machine, disks: MachineSpec) -> None:
    pid = vm.boot(disks)
    seen: list[tuple[str, float]] = []
    stop = threading.Event()

    def watch() -> None:
        for event in vm.watch(stop):
            seen.append((event, time.monotonic()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.5)  # connected
    vm.pause()
    assert vm.paused()
    vm.resume()
    assert not vm.paused()
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    watcher.join(5)
    assert not watcher.is_alive()
    names = [name for name, _ in seen]
    assert names[:2] == ["STOP", "RESUME"], names
    assert names[-1] == "EXITED"
    assert seen[-1][1] - killed < 2.0
    assert vm.pid() is None
    assert list(vm.watch(threading.Event())) == ["EXITED"]


def test_too_little_memory_fails_boot(vm: Machine, disks: MachineSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    small = MachineSpec(
        root=disks.root, layer=disks.layer, workspace=disks.workspace, memory_mib=machine.MEMORY_MIN_MIB - 1
    )
    with pytest.raises(VMError, match="MiB"):
        vm.boot(small)
    # Past the check, the guest itself fails: the kernel panics, qemu exits, boot says so.
    monkeypatch.setattr(machine, "MEMORY_MIN_MIB", 1)
    tiny = MachineSpec(root=disks.root, layer=disks.layer, workspace=disks.workspace, memory_mib=72)
    started = time.monotonic()
    with pytest.raises(VMError, match=r"(?i)panic|memory"):
        vm.boot(tiny, timeout=30)
    assert time.monotonic() - started < 25
    assert vm.pid() is None


def test_missing_guest_names_setup_script(tmp_path: Path) -> None:
    with pytest.raises(VMError, match=r"scripts/setup-vm\.sh"):
        Guest.find(tmp_path)


def test_accel_detects_hardware_not_just_dev_kvm() -> None:
    assert accel.detect(cpuinfo="flags\t: fpu sse2\n", kvm_usable=True)[0] == "tcg"
    assert "no vmx/svm" in accel.detect(cpuinfo="flags\t: fpu sse2\n", kvm_usable=True)[1]
    assert accel.detect(cpuinfo="flags\t: fpu vmx\n", kvm_usable=True)[0] == "kvm"
    assert accel.detect(cpuinfo="flags\t: fpu svm\n", kvm_usable=False)[0] == "tcg"
    assert accel.detect("tcg", cpuinfo="flags\t: vmx\n", kvm_usable=True)[0] == "tcg"
    assert accel.detect("auto", cpuinfo="flags\t: vmx\n", kvm_usable=True)[0] == "kvm"
    with pytest.raises(ValueError, match="/dev/kvm"):
        accel.detect("kvm", kvm_usable=False)
