"""The vm driver's counterpart of ``tests.conftest.Engine``: doing things to VM sandboxes behind
sandboxctl's back, the way an operator or a crash would, with the verbs the contract tests give a
container engine's command line (``kill``, ``rm -f``, ``start``, ``stop -t``, ``exec``, ``wait``,
``create``, ``container inspect``).

A VM is its directory, ``<vm dir>/sandboxes/<sandbox id>/``, whose record (``vm.json``) names
the sandbox; its "container name" ``sandboxctl-NAME`` is found by that record. Acting on a VM
goes to the VM itself: a ``kill`` is a SIGKILL of its qemu (found by its command line, which
names the directory), a ``stop`` presses its power button through its QMP socket, a ``start`` is
a boot by hand through ``drivers.vm.machine.Machine``, an ``rm -f`` kills its qemu and removes
everything of it but the workspace disk (as ``rm -f`` of a container leaves its volume).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from sandboxctl.drivers.vm import accel, disks
from sandboxctl.drivers.vm.driver import LAYER, RECORD, WORKSPACE_DISK, VMRecord, machine_spec
from sandboxctl.drivers.vm.machine import Guest, Machine, default_guest_dir

PREFIX = "sandboxctl-"
EXEC_TIMEOUT = 60.0  # seconds an exec by hand may take: the contract's are quick


def qemu_pids(under: Path) -> list[int]:
    """The qemu processes whose command line names a path under ``under``."""
    found = []
    marker = os.fsencode(str(under.resolve()) + "/")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and marker in cmdline:
            found.append(int(entry))
    return found


def _kill(pids: list[int]) -> None:
    """SIGKILL the processes and return once they are gone."""
    fds = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fds.append(fd)
    for fd in fds:
        try:
            select.select([fd], [], [], 10.0)
        finally:
            os.close(fd)


class VMEngine:
    """VMs by hand: the vm driver's "engine command line" (see the module's docstring)."""

    name = "vm"

    def __init__(self, directory: Path, guest_dir: Path | None = None) -> None:
        self.directory = directory  # the driver's directory: Config.vm_dir
        self.url = str(directory)
        self.guest_dir = guest_dir or default_guest_dir()
        self._dirs: dict[str, Path] = {}  # sandbox (container name less its prefix) -> its VM's directory

    def __repr__(self) -> str:
        return self.name

    # -- finding a VM ---------------------------------------------------------------------------

    def _record(self, directory: Path) -> dict[str, Any] | None:
        try:
            record = json.loads((directory / RECORD).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def find(self, sandbox: str) -> Path | None:
        """The directory of sandbox ``sandbox``'s VM: the one whose record names it, else the one
        last seen for it (a VM whose record was removed by hand keeps its workspace there)."""
        sandboxes = self.directory / "sandboxes"
        if sandboxes.is_dir():
            for entry in sorted(sandboxes.iterdir()):
                record = self._record(entry)
                if record and record.get("sandbox") == sandbox and record.get("sandbox_id") == entry.name:
                    self._dirs[sandbox] = entry
        return self._dirs.get(sandbox)

    def _vm(self, container: str) -> Path:
        directory = self.find(container.removeprefix(PREFIX))
        if directory is None or self._record(directory) is None:
            raise LookupError(f"no such VM: {container}")
        return directory

    def machine(self, directory: Path) -> Machine:
        return Machine(directory, Guest.find(self.guest_dir))

    # -- the command line -----------------------------------------------------------------------

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = list(args)
        # On a thread of its own, as an operator's command is a process of its own: Machine's QMP
        # runs an event loop, which a thread already running one (an async test's) cannot. A daemon
        # thread, not waited for once the test gives up on it (pytest's timeout).
        done: concurrent.futures.Future[tuple[int, str]] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(self._run(argv))
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        threading.Thread(target=run, name=f"vm-{argv[0]}", daemon=True).start()
        try:
            code, out = done.result()
            err = ""
        except LookupError as exc:
            code, out, err = 125, "", str(exc)
        done = subprocess.CompletedProcess(["vm", *argv], code, out, err)
        if check and code != 0:
            raise subprocess.CalledProcessError(code, done.args, out, err)
        return done

    def _run(self, argv: list[str]) -> tuple[int, str]:
        verb = argv[0]
        if verb == "container" and argv[1] == "inspect":
            directory = self._vm(argv[2])
            return 0, json.dumps([{"State": self._state(directory), "Record": self._record(directory)}])
        if verb == "kill":
            _kill(qemu_pids(self._vm(argv[1])))
            return 0, argv[1] + "\n"
        if verb == "rm" and argv[1] == "-f":
            self._remove_vm(argv[2])
            return 0, argv[2] + "\n"
        if verb == "start":
            self._boot(self._vm(argv[1]))
            return 0, argv[1] + "\n"
        if verb == "stop" and argv[1] == "-t":
            self.machine(self._vm(argv[3])).powerdown(float(argv[2]))
            return 0, argv[3] + "\n"
        if verb == "wait":
            return 0, f"{self._wait(self._vm(argv[1]))}\n"
        if verb == "exec":
            chunks: list[bytes] = []
            machine = self.machine(self._vm(argv[1]))
            code = machine.exec(argv[2:], lambda fd, chunk: chunks.append(chunk), timeout=EXEC_TIMEOUT)
            return code, b"".join(chunks).decode(errors="replace")
        if verb == "create":
            return 0, self._create(argv[1:]) + "\n"
        raise ValueError(f"VMEngine does not know {' '.join(argv)!r}")

    def _state(self, directory: Path) -> dict[str, object]:
        """Read from the VM itself: its qemu, and the boot record and serial log it keeps."""
        machine = self.machine(directory)
        pid = machine.pid()
        paused = pid is not None and machine.paused()
        booted = bool(machine.started_at())
        status = "paused" if paused else "running" if pid is not None else "exited" if booted else "created"
        return {
            "Running": pid is not None,
            "Paused": paused,
            "Status": status,
            "Pid": pid or 0,
            "StartedAt": machine.booted_at(),  # qemu's launch, as an engine's StartedAt (RFC 3339)
        }

    def _boot(self, directory: Path) -> None:
        """A boot by hand, from what the VM's record says it is made of."""
        record = msgspec.json.decode((directory / RECORD).read_bytes(), type=VMRecord)
        self.machine(directory).boot(machine_spec(record, directory, accel.detect("")[0]), timeout=90)

    def _wait(self, directory: Path, timeout: float = 60.0) -> int:
        """Wait for the VM's qemu to end; the exit code its guest reported (137 if it said none)."""
        deadline = time.monotonic() + timeout
        while qemu_pids(directory):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the VM in {directory} did not end within {timeout:g} s")
            time.sleep(0.05)
        code = self.machine(directory).exit_code()
        return 137 if code is None else code

    def _remove_vm(self, container: str) -> None:
        """``rm -f``: its qemu killed, its record, layer and the rest removed; the workspace disk stays."""
        directory = self._vm(container)
        _kill(qemu_pids(directory))
        for entry in directory.iterdir():
            if entry.name == WORKSPACE_DISK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _create(self, argv: list[str]) -> str:
        """``create --name sandboxctl-X --label K=V ... IMAGE``: a VM made by someone else, in the
        directory of the sandbox id its ``sandboxctl.sandbox_id`` label gives (an orphan when no
        sandbox has that id). Other options (``--network none``) mean nothing to a VM."""
        labels: dict[str, str] = {}
        name, image, rest = "", "", list(argv)
        while rest:
            arg = rest.pop(0)
            if arg == "--name":
                name = rest.pop(0)
            elif arg == "--label":
                key, _, value = rest.pop(0).partition("=")
                labels[key] = value
            elif arg.startswith("--"):
                rest.pop(0)
            else:
                image = arg
        sandbox, sandbox_id = labels.pop("sandboxctl.sandbox"), labels.pop("sandboxctl.sandbox_id")
        labels.pop("sandboxctl.managed", None)
        directory = self.directory / "sandboxes" / sandbox_id
        directory.mkdir(parents=True, mode=0o700)
        root = disks.root_disk(image, self.directory / "images")
        disks.make_layer(directory / LAYER)
        disks.make_workspace(directory / WORKSPACE_DISK)
        record = VMRecord(
            sandbox=sandbox,
            sandbox_id=sandbox_id,
            vm_id=f"vm-{secrets.token_hex(8)}",
            image=image,
            root=str(root),
            labels=labels,
        )
        (directory / RECORD).write_bytes(msgspec.json.encode(record))
        self._dirs[name.removeprefix(PREFIX)] = directory
        return record.vm_id

    # -- what the tests ask -----------------------------------------------------------------------

    def state(self, sandbox: str) -> dict[str, object]:
        return json.loads(self("container", "inspect", f"{PREFIX}{sandbox}").stdout)[0]["State"]  # type: ignore[no-any-return]

    def record(self, sandbox: str) -> dict[str, Any]:
        """The VM's record (vm.json): what it was made from, for whom."""
        return json.loads(self("container", "inspect", f"{PREFIX}{sandbox}").stdout)[0]["Record"]  # type: ignore[no-any-return]

    def container_exists(self, sandbox: str) -> bool:
        return self("container", "inspect", f"{PREFIX}{sandbox}", check=False).returncode == 0

    def volume_exists(self, sandbox: str) -> bool:
        """Whether the sandbox's workspace disk is there."""
        directory = self.find(sandbox)
        return directory is not None and (directory / WORKSPACE_DISK).exists()

    def remove(self, sandbox: str) -> None:
        directory = self.find(sandbox)
        if directory is not None:
            _kill(qemu_pids(directory))
            shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        """Kill every qemu of this directory's VMs (a test's own, whatever became of it)."""
        _kill(qemu_pids(self.directory))
