"""The vm driver: each sandbox a QEMU microVM, with the driver contract of the container engines.

Everything sandboxctl makes for a VM lives in one directory named by the sandbox's id,
``<vm dir>/sandboxes/<sandbox id>/``: the record (``vm.json``: what the sandbox was made from,
and the id of this make of it, which stands where a container id stands), the writable layer
over the image's shared root disk, the **workspace disk**, and what qemu runs with (pidfile, QMP
and console sockets, the serial log). Only ``delete`` removes the workspace disk, and only in the
directory of the sandbox id it was given. Blank disks are made ahead in ``<vm dir>/spares/``
(``disks.Spares``): a create takes its workspace and layer from there when it can, so that it
waits for no mkfs; a spare belongs to no sandbox until it is moved into one's directory.

What a container engine keeps (the container's state, its events) is kept here on disk and read
from the processes themselves, so the worker, the CLI (exec, logs) and an operator all see the
same VM: qemu outlives the worker that booted it, and a worker that starts again finds it.

Facts come from watching each qemu (``Machine.watch``, a thread per running VM): its QMP
events on a monitor of their own (STOP and RESUME: a pause or resume, by this driver or anyone
speaking QMP) and its process's end through a pidfd (a ``kill -9`` is seen in milliseconds);
and from the driver's own pauses, resumes and removals. A boot's start is the worker's to report
(from what ``start`` returns). The guest's poweroff, reset and crash all end the qemu process
(it runs with ``-no-reboot``; SHUTDOWN and RESET come just before), so its end is the one fact
of a VM that stopped, whoever stopped it. A sweep every second finds VMs booted, ended or
removed by anyone else, so no change goes unreported.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from sandboxctl.drivers.base import (
    CHUNK,
    ContainerInfo,
    ContainerMissing,
    DriverError,
    EngineEvent,
    ExecControl,
    SandboxSpec,
    grace_seconds,
    refuse_if_aborted,
    tell_launched,
)
from sandboxctl.drivers.vm import accel, disks
from sandboxctl.drivers.vm.machine import (
    Growth,
    Guest,
    Machine,
    MachineSpec,
    VMError,
    alive,
    default_guest_dir,
    log_tail,
)
from sandboxctl.events.limits import VM_MEMORY_MIN
from sandboxctl.events.spec import Resources

MEMORY_DEFAULT_MIB = 256  # a VM made with no memory limit gets this much
MEMORY_MIN_MIB = VM_MEMORY_MIN >> 20
STOPPED = "stopped"  # holds the incarnation of a run that a stop powered off (its end is no crash)
PAUSED = "paused"  # holds the incarnation of a run that this driver paused
RECORD = "vm.json"
LAYER = "layer.img"
WORKSPACE_DISK = "workspace.img"
SWEEP_EVERY = 1.0  # seconds between the sweeps that find VMs booted or ended by anyone else
HISTORY = 1024  # events kept for a watcher that asks for those since a moment
FOLLOW_POLL = 0.1  # seconds between looks at a followed log where it cannot be watched (no inotify)


class VMRecord(msgspec.Struct, kw_only=True):
    """What a VM sandbox was made from: the driver's counterpart of a container's configuration."""

    sandbox: str
    sandbox_id: str
    vm_id: str  # this make of the VM (a start with new resources makes it again, with a new id)
    image: str
    root: str  # the image's root disk, shared read-only by every VM of that image
    command: list[str] = []
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    resources: Resources = Resources()


def machine_spec(record: VMRecord, directory: Path, acceleration: str) -> MachineSpec:
    """What qemu boots for the VM ``record`` describes, whose files are in ``directory``."""
    return MachineSpec(
        root=Path(record.root),
        layer=directory / LAYER,
        workspace=directory / WORKSPACE_DISK,
        cpus=vm_cpus(record.resources),
        memory_mib=vm_memory_mib(record.resources),
        command=tuple(record.command),
        env=tuple(sorted(record.env.items())),
        accel=acceleration,
    )


def vm_cpus(resources: Resources) -> int:
    """Whole virtual CPUs for a CPU limit: a fraction of a CPU is one, never more than the host has."""
    wanted = resources.cpus or 1.0
    return max(1, min(math.ceil(wanted), os.cpu_count() or 1))


def vm_memory_mib(resources: Resources) -> int:
    return MEMORY_DEFAULT_MIB if resources.memory is None else resources.memory // (1 << 20)


def _boots_in(operation: str, resources: Resources) -> None:
    """DriverError unless a guest boots in the memory ``resources`` give. The decider refuses less
    before anything is logged; this holds for what a log written before that floor may ask."""
    memory = vm_memory_mib(resources)
    if memory < MEMORY_MIN_MIB:
        raise DriverError(
            operation, f"memory {memory} MiB is below the {MEMORY_MIN_MIB} MiB a VM sandbox's guest needs to boot"
        )


class VMDriver:
    """The driver contract (drivers.base.Driver) on QEMU microVMs; see the module's docstring."""

    name = "vm"
    # Under TCG each booting VM takes a core: more at once only makes every boot slower.
    parallelism = 4

    def __init__(
        self,
        directory: Path,
        guest_dir: Path | None = None,
        acceleration: str = "",
        engine_cli: Iterable[str] = ("podman",),
        timeout: float = 60.0,
        spares: int = disks.SPARES,
    ) -> None:
        self.directory = directory
        self.guest_dir = guest_dir or default_guest_dir()
        self.acceleration, self.acceleration_reason = accel.detect(acceleration)
        self.engine_cli = tuple(engine_cli)
        self._images = disks.ImageIndex(self.engine_cli)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._history: collections.deque[EngineEvent] = collections.deque(maxlen=HISTORY)
        self._news = threading.Condition(self._lock)
        self._watched: dict[str, tuple[int, str]] = {}  # sandbox id -> (qemu pid, incarnation) watched
        self._booted: dict[str, str] = {}  # sandbox id -> the boot (incarnation) this driver reported the start of
        # Held while this driver removes a VM (or makes it anew) and reports it, and while a sweep
        # looks for VMs removed by anyone else: a removal is reported once, by whoever made it.
        self._removing = threading.Lock()
        self._closed = threading.Event()
        self._spares = disks.Spares(self.spares_dir, spares)  # made by the worker's driver alone (prepare)

    # -- where things are ----------------------------------------------------------------

    @property
    def sandboxes_dir(self) -> Path:
        return self.directory / "sandboxes"

    @property
    def spares_dir(self) -> Path:
        return self.directory / "spares"

    @property
    def images_dir(self) -> Path:
        return self.directory / "images"

    def _dir(self, sandbox_id: str) -> Path:
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            raise ContainerMissing("inspect", f"no VM can be the sandbox id {sandbox_id!r}'s")
        return self.sandboxes_dir / sandbox_id

    def _record(self, sandbox_id: str) -> VMRecord | None:
        try:
            return msgspec.json.decode((self._dir(sandbox_id) / RECORD).read_bytes(), type=VMRecord)
        except (OSError, msgspec.DecodeError, ContainerMissing):
            return None

    def _write_record(self, record: VMRecord) -> None:
        path = self._dir(record.sandbox_id) / RECORD
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(record))
        os.replace(tmp, path)

    def _own(self, operation: str, sandbox: str, sandbox_id: str) -> VMRecord:
        """The sandbox's VM, checked by its record: ContainerMissing if there is none, or if the
        record in that id's directory names another sandbox (it is not this sandbox's)."""
        if not sandbox_id:
            raise ContainerMissing(operation, f"no sandbox id given for {sandbox}: no VM is its without one")
        record = self._record(sandbox_id)
        if record is None or record.sandbox != sandbox or record.sandbox_id != sandbox_id:
            raise ContainerMissing(operation, f"sandbox {sandbox} (id {sandbox_id}) has no VM")
        return record

    def _machine(self, sandbox_id: str) -> Machine:
        """A Machine to boot: DriverError of the start when the guest kernel is not installed."""
        try:
            guest = Guest.find(self.guest_dir)
        except VMError as exc:
            raise DriverError("start", str(exc)) from exc
        return Machine(self._dir(sandbox_id), guest)

    def _quiet_machine(self, sandbox_id: str) -> Machine:
        """A Machine for reading a VM's state: needs no guest kernel (a host whose kernel went
        still sees its VMs)."""
        return Machine(self._dir(sandbox_id), Guest(kernel=Path("/nonexistent"), initrd=Path("/nonexistent")))

    # -- state ------------------------------------------------------------------------------

    def _info(self, record: VMRecord, ask_qemu: bool = False) -> ContainerInfo:
        """The VM as a container engine describes a container. Whether it is paused is what this
        driver's own pause and resume recorded (a file, read in microseconds); ``ask_qemu`` asks
        qemu itself (a QMP round trip, milliseconds), so a pause made behind the driver's back is
        seen: a reconciliation asks, each operation and the watcher's sweep every second do not."""
        machine = self._quiet_machine(record.sandbox_id)
        pid = machine.pid()
        incarnation = machine.booted_at()
        paused = False
        if pid is not None and ask_qemu:
            with contextlib.suppress(VMError, OSError):
                paused = machine.paused()
        elif pid is not None:
            paused = self._marked(record.sandbox_id, PAUSED, incarnation)
        exit_code = 0
        if pid is None and incarnation:
            code = machine.exit_code()
            if code is None and not self._marked(record.sandbox_id, STOPPED, incarnation) and not machine.powered_off():
                # Ended neither by its command nor by a stop (this driver's, or anyone's power button,
                # which the guest answers by powering off cleanly): qemu was killed (or crashed).
                code = 137
            exit_code = code or 0
        status = "paused" if paused else "running" if pid is not None else "exited" if incarnation else "created"
        return ContainerInfo(
            sandbox=record.sandbox,
            sandbox_id=record.sandbox_id,
            container_id=record.vm_id,
            running=pid is not None,
            status=status,
            exit_code=exit_code,
            incarnation=incarnation,
            paused=paused,
            resources=record.resources,
        )

    def _marked(self, sandbox_id: str, mark: str, incarnation: str) -> bool:
        """Whether run ``incarnation`` of the VM carries ``mark`` (STOPPED, PAUSED)."""
        try:
            return bool(incarnation) and (self._dir(sandbox_id) / mark).read_text() == incarnation
        except OSError:
            return False

    def _mark(self, sandbox_id: str, mark: str, incarnation: str | None) -> None:
        """Mark run ``incarnation`` of the VM (None: take the mark off)."""
        path = self._dir(sandbox_id) / mark
        if incarnation is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(incarnation)

    def prepare(self) -> None:
        """Start making blank disks ahead (``disks.Spares``), for the creates of the worker that
        called it."""
        self._spares.start()

    def ping(self) -> None:
        try:
            Guest.find(self.guest_dir)
            from sandboxctl.drivers.vm.machine import qemu_binary

            qemu_binary()
        except VMError as exc:
            raise DriverError("ping", str(exc)) from exc

    def inspect(self, sandbox: str, sandbox_id: str) -> ContainerInfo | None:
        try:
            return self._info(self._own("inspect", sandbox, sandbox_id))
        except ContainerMissing:
            return None

    def workspace(self, sandbox: str, sandbox_id: str) -> bool:
        try:
            directory = self._dir(sandbox_id)
        except ContainerMissing:
            return False
        return (directory / WORKSPACE_DISK).exists()

    def _records(self) -> list[VMRecord]:
        """The record of every VM, each in the directory of its own sandbox id."""
        records = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(self.sandboxes_dir.iterdir()):
                record = self._record(entry.name)
                if record is not None and record.sandbox_id == entry.name:
                    records.append(record)
        return records

    def list_managed(self, ask_qemu: bool = True) -> list[ContainerInfo]:
        return [self._info(record, ask_qemu) for record in self._records()]

    # -- the lifecycle ----------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> ContainerInfo:
        existing = self._record(spec.sandbox_id) if spec.sandbox_id else None
        if existing is not None:
            if existing.sandbox != spec.name:
                raise DriverError("create", f"the VM of sandbox id {spec.sandbox_id} is sandbox {existing.sandbox}'s")
            return self._info(existing)
        for other in self._records():  # the records alone: no VM's state is needed to tell
            if other.sandbox == spec.name and other.sandbox_id != spec.sandbox_id:
                raise DriverError(
                    "create",
                    f"a VM for sandbox {spec.name} already exists and belongs to sandbox id {other.sandbox_id}",
                )
        _boots_in("create", spec.resources)
        directory = self._dir(spec.sandbox_id)
        try:
            image = self._images.info(spec.image)
            root = disks.root_disk(spec.image, self.images_dir, self.engine_cli, image)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Made durable as the VM launches (start), not on the create's path: the placing of
            # spare disks is a few renames, which the guest's boot more than covers.
            disks.make_disks(directory / WORKSPACE_DISK, directory / LAYER, self._spares, sync=False)
        except disks.DiskError as exc:
            raise DriverError("create", str(exc)) from exc
        # What a container of the image would run with, but for what the user said.
        command = list(spec.command or image.command)
        env = {**image.env, **spec.env}
        record = VMRecord(
            sandbox=spec.name,
            sandbox_id=spec.sandbox_id,
            vm_id=f"vm-{secrets.token_hex(8)}",
            image=spec.image,
            root=str(root),
            command=command,
            env=env,
            labels=dict(spec.labels),
            resources=spec.resources,
        )
        self._write_record(record)
        return self._info(record)

    def start(self, sandbox: str, sandbox_id: str, launched: Callable[[], None] | None = None) -> ContainerInfo:
        record = self._own("start", sandbox, sandbox_id)
        directory = self._dir(sandbox_id)
        synced = False

        def sync() -> None:
            """Make the names in the VM's directory durable (a create places its spare disks there
            without waiting for it): as qemu launches, while the guest boots, before anyone is told
            of the launch; at the end of a start that launched nothing, all the same."""
            nonlocal synced
            disks.sync_dir(directory)
            synced = True

        try:
            return self._start(record, directory, launched, sync)
        finally:
            if not synced:
                sync()

    def _start(
        self, record: VMRecord, directory: Path, launched: Callable[[], None] | None, sync: Callable[[], None]
    ) -> ContainerInfo:
        sandbox, sandbox_id = record.sandbox, record.sandbox_id
        machine = self._machine(sandbox_id)
        if machine.pid() is not None:
            return self._info(record)
        try:
            # The guest must find the workspace sound: mended where e2fsck can, refused with its
            # words where it cannot, and never made anew (its files are the user's).
            mended = disks.check(directory / WORKSPACE_DISK)
            if mended:
                self._log_line(directory, f"sandboxctl: the workspace disk was mended before boot: {mended}")
            if not (directory / LAYER).exists() and not self._spares.take(disks.LABEL_LAYER, directory / LAYER):
                disks.make_layer(directory / LAYER)
        except disks.DiskError as exc:
            raise DriverError("start", f"the workspace disk of sandbox {sandbox} is damaged: {exc}") from exc
        if not Path(record.root).exists():  # the image cache was cleared: made again from the image
            try:
                record.root = str(disks.root_disk(record.image, self.images_dir, self.engine_cli))
            except disks.DiskError as exc:
                raise DriverError("start", str(exc)) from exc
            self._write_record(record)
        spec = machine_spec(record, directory, self.acceleration)
        try:
            # Watched from its launch: the watcher's QMP connection is made while the guest boots,
            # not in the moment the start is reported. Its end before it was ready is this start's
            # failure, reported by the start alone (see _ended). The caller hears of the launch
            # then too (a create reports its ContainerCreated while the guest boots), once the
            # VM's directory is synced.
            def on_launch() -> None:
                self._watch(sandbox_id)
                sync()
                tell_launched(launched)

            machine.boot(spec, timeout=max(self.timeout, 60.0), launched=on_launch)
        except VMError as exc:
            raise DriverError("start", str(exc)) from exc
        info = self._info(record)
        with self._lock:
            self._booted[sandbox_id] = info.incarnation  # the worker reports it: no news for a sweep
        self._watch(record.sandbox_id)
        return info

    def stop(self, sandbox: str, sandbox_id: str, timeout: float) -> ContainerInfo:
        record = self._own("stop", sandbox, sandbox_id)
        machine = self._quiet_machine(sandbox_id)
        if machine.pid() is not None:
            try:
                self._mark(sandbox_id, STOPPED, machine.booted_at())
                machine.powerdown(grace_seconds(timeout))  # a paused guest is thawed first, to hear it
            except VMError as exc:
                raise DriverError("stop", str(exc)) from exc
        return self._info(record)

    def pause(self, sandbox: str, sandbox_id: str) -> ContainerInfo:
        record = self._own("pause", sandbox, sandbox_id)
        machine = self._quiet_machine(sandbox_id)
        if machine.pid() is None:
            raise DriverError("pause", f"the VM of sandbox {sandbox} is not running: nothing to pause")
        incarnation = machine.booted_at()
        try:
            paused = machine.paused()  # (a VM that cannot be asked is neither marked nor paused)
            # Marked first: the watcher, hearing QMP's STOP, then knows the pause for this driver's
            # (and a VM found paused already is marked as paused).
            self._mark(sandbox_id, PAUSED, incarnation)
            if not paused:
                machine.pause()
        except VMError as exc:
            with contextlib.suppress(VMError, OSError):
                if not machine.paused():
                    self._mark(sandbox_id, PAUSED, None)
            raise DriverError("pause", str(exc)) from exc
        info = self._info(record)
        self._emit("pause", info)
        return info

    def resume(self, sandbox: str, sandbox_id: str) -> ContainerInfo:
        record = self._own("resume", sandbox, sandbox_id)
        machine = self._quiet_machine(sandbox_id)
        try:
            paused = machine.pid() is not None and machine.paused()  # (one that cannot be asked is left as it is)
            self._mark(sandbox_id, PAUSED, None)  # first, as pause marks first (one found running is not paused)
            if paused:
                try:
                    machine.resume()
                except VMError:
                    with contextlib.suppress(VMError, OSError):
                        if machine.paused():
                            self._mark(sandbox_id, PAUSED, machine.booted_at())
                    raise
                self._emit("unpause", self._info(record))
        except VMError as exc:
            raise DriverError("resume", str(exc)) from exc
        return self._info(record)

    def remake(self, spec: SandboxSpec) -> ContainerInfo:
        record = self._own("update", spec.name, spec.sandbox_id)
        machine = self._quiet_machine(spec.sandbox_id)
        if machine.pid() is not None:
            raise DriverError("update", f"the VM of sandbox {spec.name} is running: it is made again only stopped")
        _boots_in("update", spec.resources)
        old = record.vm_id
        record.vm_id = f"vm-{secrets.token_hex(8)}"
        record.resources = spec.resources
        try:
            machine.forget_boots()
        except VMError as exc:
            raise DriverError("update", str(exc)) from exc
        try:
            disks.make_layer(self._dir(spec.sandbox_id) / LAYER)  # a VM made again starts from the image
        except disks.DiskError as exc:
            raise DriverError("update", str(exc)) from exc
        with self._removing:
            self._write_record(record)
            gone = ContainerInfo(
                sandbox=spec.name, sandbox_id=spec.sandbox_id, container_id=old, running=False, status=""
            )
            self._emit("remove", gone)
        return self._info(record)

    def delete(self, sandbox: str, sandbox_id: str) -> str:
        try:
            directory = self._dir(sandbox_id)
        except ContainerMissing:
            return ""
        record = self._record(sandbox_id)
        if record is not None and record.sandbox != sandbox:
            raise DriverError(
                "delete", f"the VM directory of sandbox id {sandbox_id} is sandbox {record.sandbox}'s, not {sandbox}'s"
            )
        if not directory.exists():
            return ""
        machine = self._quiet_machine(sandbox_id)
        try:
            machine.kill()
        except VMError as exc:
            raise DriverError("delete", str(exc)) from exc
        with self._lock:
            self._booted.pop(sandbox_id, None)
        with self._removing:
            shutil.rmtree(directory, ignore_errors=False)
            if record is not None:
                gone = ContainerInfo(
                    sandbox=sandbox, sandbox_id=sandbox_id, container_id=record.vm_id, running=False, status=""
                )
                self._emit("remove", gone)
                return record.vm_id
        return ""

    # -- exec and logs ----------------------------------------------------------------------

    def exec(
        self,
        sandbox: str,
        sandbox_id: str,
        command: list[str],
        output: Callable[[int, bytes], None],
        stdin: IO[bytes] | None = None,
        control: ExecControl | None = None,
    ) -> int:
        refuse_if_aborted(control)
        self._own("exec", sandbox, sandbox_id)
        machine = self._quiet_machine(sandbox_id)
        if machine.pid() is None:
            raise DriverError("exec", f"the VM of sandbox {sandbox} is not running")
        data = None
        if stdin is not None:
            chunks = []
            while chunk := stdin.read(CHUNK):
                chunks.append(chunk)
            data = b"".join(chunks)
        ended = threading.Event()
        if control is not None:
            control._attach(_Ending(ended))
        try:
            return machine.exec(command, output, stdin=data, abort=ended)
        except VMError as exc:
            raise DriverError("exec", str(exc)) from exc

    def logs(
        self, sandbox: str, sandbox_id: str, tail: int | None = None, since: float | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        self._own("logs", sandbox, sandbox_id)
        if since is not None:
            raise DriverError("logs", "a VM's console log has no times: --since is not available on vm sandboxes")
        return _read_log(self._quiet_machine(sandbox_id), tail, follow)

    def interactive(self, sandbox: str, sandbox_id: str, command: list[str], tty: bool) -> list[str]:
        self._own("exec", sandbox, sandbox_id)
        console = [sys.executable, "-m", "sandboxctl.drivers.vm.console", str(self._dir(sandbox_id))]
        return [*console, *(["--tty"] if tty else []), "--", *command]

    def path_stat(self, sandbox: str, sandbox_id: str, path: str) -> dict[str, Any] | None:
        raise DriverError("copy", "copy is not available on vm sandboxes yet: use exec with tar")

    def copy_in(self, sandbox: str, sandbox_id: str, directory: str, archive: Iterable[bytes]) -> None:
        raise DriverError("copy", "copy is not available on vm sandboxes yet: use exec with tar")

    def copy_out(self, sandbox: str, sandbox_id: str, path: str) -> Iterator[bytes]:
        raise DriverError("copy", "copy is not available on vm sandboxes yet: use exec with tar")

    def copy_workspace(self, source: str, source_id: str, sandbox: str, sandbox_id: str) -> None:
        self._own("clone", source, source_id)
        self._own("clone", sandbox, sandbox_id)
        if self._quiet_machine(source_id).pid() is not None:
            raise DriverError(
                "clone", f"the VM of sandbox {source} is running: its workspace disk is copied only stopped"
            )
        target = self._dir(sandbox_id) / WORKSPACE_DISK
        tmp = target.with_suffix(".copy")
        try:
            with open(self._dir(source_id) / WORKSPACE_DISK, "rb") as src, open(tmp, "wb") as dst:
                _sparse_copy(src, dst)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DriverError("clone", f"could not copy the workspace disk of sandbox {source}: {exc}") from exc

    # -- watching -----------------------------------------------------------------------------

    def _emit(self, action: str, info: ContainerInfo, exit_code: int | None = None) -> None:
        event = EngineEvent(
            action=action,
            sandbox=info.sandbox,
            container_id=info.container_id,
            sandbox_id=info.sandbox_id,
            exit_code=exit_code,
            time_ns=time.time_ns(),
        )
        with self._news:
            self._history.append(event)
            self._news.notify_all()

    def _watch(self, sandbox_id: str) -> None:
        """Watch the VM's qemu (if it runs and is not watched already) on a thread of its own:
        its QMP events and its process's end (Machine.watch)."""
        machine = self._quiet_machine(sandbox_id)
        pid = machine.pid()
        if pid is None:
            return
        with self._lock:
            if self._watched.get(sandbox_id, (0, ""))[0] == pid:
                return
            incarnation = machine.booted_at()
            self._watched[sandbox_id] = (pid, incarnation)
        threading.Thread(
            target=self._watch_one,
            args=(sandbox_id, pid, incarnation),
            name=f"sandboxctl-vm-watch-{sandbox_id[:12]}",
            daemon=True,
        ).start()

    def _watch_one(self, sandbox_id: str, pid: int, incarnation: str) -> None:
        """Report what qemu ``pid`` tells of run ``incarnation``: a pause or a resume made by anyone
        (QMP STOP and RESUME; the guest's power-off, reset and crash end qemu, run ``-no-reboot``),
        then its end."""
        machine = self._quiet_machine(sandbox_id)
        for event in machine.watch(self._closed):
            if event == "EXITED" or machine.pid() != pid:
                self._ended(sandbox_id, pid)
                return
            if event in ("STOP", "RESUME"):
                self._paused_or_resumed(sandbox_id, incarnation, event == "STOP")

    def _paused_or_resumed(self, sandbox_id: str, incarnation: str, stopped: bool) -> None:
        """QMP said the VM's CPUs stopped or ran again: a pause or resume, by this driver or anyone.
        Marked and reported unless this driver's own pause or resume marked it already. A stop
        that is no pause (qemu stops a VM on a disk's I/O error) is not reported as one."""
        record = self._record(sandbox_id)
        if record is None:
            return
        marked = self._marked(sandbox_id, PAUSED, incarnation)
        if stopped and not marked:
            try:
                paused = self._quiet_machine(sandbox_id).paused()
            except (VMError, OSError):
                return  # ended meanwhile: its end is reported
            if paused:
                self._mark(sandbox_id, PAUSED, incarnation)
                self._emit("pause", self._info(record))
        elif not stopped and marked:
            self._mark(sandbox_id, PAUSED, None)
            self._emit("unpause", self._info(record))

    def _ended(self, sandbox_id: str, pid: int) -> None:
        with self._lock:
            if self._watched.get(sandbox_id, (0, ""))[0] != pid:
                return
            del self._watched[sandbox_id]
        record = self._record(sandbox_id)
        if record is None:
            return  # deleted: its removal is reported on its own
        info = self._info(record)
        if not info.running and self._quiet_machine(sandbox_id).ready():  # else a boot that failed
            self._emit("die", info, info.exit_code)

    def _sweep(self, seen: dict[str, str], made: dict[str, ContainerInfo]) -> None:
        """Report the VMs booted, ended or removed since the last sweep by anyone but this driver,
        and watch every running one. ``seen``: the running VMs' boots at the last sweep; ``made``:
        every VM (by sandbox id) at the last sweep."""
        now: dict[str, str] = {}
        infos = self.list_managed(ask_qemu=False)
        for info in infos:
            if (
                info.running and self._quiet_machine(info.sandbox_id).ready()
            ):  # a boot under way is its booter's to report
                now[info.sandbox_id] = info.incarnation
                self._watch(info.sandbox_id)
                if seen.get(info.sandbox_id) != info.incarnation:
                    with self._lock:
                        known = self._booted.get(info.sandbox_id) == info.incarnation
                    if not known:  # booted by anyone else (an operator, another worker): news
                        self._emit("start", info)
        seen.clear()
        seen.update(now)
        with self._removing:
            for sandbox_id, old in list(made.items()):
                record = self._record(sandbox_id)
                if record is not None and record.vm_id == old.container_id:
                    continue
                del made[sandbox_id]
                with self._lock:
                    told = any(e.action == "remove" and e.container_id == old.container_id for e in self._history)
                if not told:  # removed by anyone else (its record gone): news, as a container's removal is
                    gone = ContainerInfo(
                        sandbox=old.sandbox,
                        sandbox_id=sandbox_id,
                        container_id=old.container_id,
                        running=False,
                        status="",
                    )
                    self._emit("remove", gone)
        for info in infos:
            made.setdefault(info.sandbox_id, info)

    def events(self, since: float | None = None) -> Iterator[EngineEvent]:
        since_ns = int((since if since is not None else time.time()) * 1e9)
        with self._lock:
            replay = [e for e in self._history if e.time_ns >= since_ns]
            last = replay[-1] if replay else (self._history[-1] if self._history else None)
        yield from replay
        seen: dict[str, str] = {}
        made: dict[str, ContainerInfo] = {}
        self._sweep(seen, made)
        last_sweep = time.monotonic()
        while not self._closed.is_set():
            with self._news:
                fresh = _after(self._history, last)
                if not fresh:
                    self._news.wait(SWEEP_EVERY)
                    fresh = _after(self._history, last)
            if fresh:
                last = fresh[-1]
                yield from fresh
            if time.monotonic() - last_sweep >= SWEEP_EVERY:
                self._sweep(seen, made)
                last_sweep = time.monotonic()

    def _log_line(self, directory: Path, line: str) -> None:
        with contextlib.suppress(OSError), open(self._quiet_machine(directory.name).logs(), "ab") as log:
            log.write(line.encode() + b"\n")

    def close(self) -> None:
        self._closed.set()
        self._spares.close()
        with self._news:
            self._news.notify_all()


class _Ending:
    """An exec's end, for ExecControl: the console session sees the event and kills the command."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def end(self) -> None:
        self.event.set()


def _read_log(machine: Machine, tail: int | None, follow: bool) -> Iterator[bytes]:
    """The serial log: its last ``tail`` lines, then (with ``follow``) what comes, as qemu writes
    it, until the VM that runs now ends. That qemu is taken before the log is read: while it
    runs, no boot trims the log (machine.trim_log) under the reader."""
    path = machine.logs()
    pidfd = machine.pidfd() if follow else None
    try:
        data, offset = log_tail(path, tail)
        if data:
            yield data
        if not follow:
            return
        growth = Growth(path, offset)  # from what was read: nothing written since is missed
        try:
            while True:
                chunk = growth.read()
                if chunk:
                    yield chunk
                elif pidfd is None or not alive(pidfd):
                    rest = growth.read()  # what it wrote before it ended
                    if rest:
                        yield rest
                    return
                else:
                    growth.wait(pidfd, math.inf, poll=FOLLOW_POLL)  # woken by a write or by its end
        finally:
            growth.close()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _after(history: collections.deque[EngineEvent], last: EngineEvent | None) -> list[EngineEvent]:
    """The events in ``history`` after ``last`` (all of them if ``last`` is None or has aged out)."""
    events = list(history)
    if last is None:
        return events
    for index in range(len(events) - 1, -1, -1):
        if events[index] is last:
            return events[index + 1 :]
    return events


def _sparse_copy(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy a disk image, leaving its holes holes (a 1 GiB workspace is mostly empty)."""
    size = os.fstat(src.fileno()).st_size
    while chunk := src.read(1 << 20):
        if chunk.count(0) == len(chunk):
            dst.seek(len(chunk), os.SEEK_CUR)
        else:
            dst.write(chunk)
    dst.truncate(size)
