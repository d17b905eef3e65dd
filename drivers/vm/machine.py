"""One sandbox as a QEMU microVM: boot, stop, pause, exec, watch, all synchronous.

A VM boots the guest ``scripts/setup-vm.sh`` builds (``Guest``) over three raw ext4 disks, found
in the guest by label: ``root`` (the image's filesystem, attached read-only, so many VMs share
one), ``layer`` (the sandbox's writable overlayfs upper) and ``workspace`` (mounted at
``/workspace``, the command's working directory). Everything a VM has on the host lives in its
``directory``: QEMU's pidfile, sockets and serial log, the console locks and the boot record, so
a restarted worker finds a VM it did not start (QEMU runs daemonized, outside the worker).

**Kernel command line.** The guest learns what to run from keys on it (at most 2047 bytes in
all): ``sandboxctl.boot=<boot id>``, ``sandboxctl.cmd=<argv>`` (absent: the VM idles),
``sandboxctl.env=<environment>`` (each item ``NAME=value``; ``PATH`` is added when not given)
``sandboxctl.term=<seconds>`` (how long a stop gives the processes after SIGTERM) and
``sandboxctl.consoles=<n>`` (the virtio consoles, each with an exec agent: CONSOLES). A list is
its items joined by ``,``, each item ``_`` + base64 of its bytes (the ``_`` keeps an empty
argument a field).

**Serial console** (``serial.log``, appended across boots: the sandbox's log; a boot first trims
one grown past LOG_KEEP to its last half, at a line's start). The command's
output (stdout and stderr merged, on a pipe, not a tty) goes there with the kernel's few
messages (``quiet``) and the guest's markers, each on a line of its own:
``sandboxctl-ready <boot id>`` once the disks are mounted, the exec agents listen and the
command is launched (so the guest is settled when the host hears it);
``sandboxctl-exit <code>`` when the command ended by itself (not when a stop ended it);
``sandboxctl-fail <why>`` when the guest cannot set up (its disks missing, say), before it
powers off. When the command ends, or the ACPI power button is pressed (QMP
``system_powerdown``), the guest sends every process SIGTERM, waits up to ``sandboxctl.term``
seconds, SIGKILLs what is left, syncs, unmounts the workspace and the layer and powers off: a
stop whose grace covers that leaves the workspace clean for e2fsck.

**Exec protocol**, on four virtio consoles (``hvc0.sock`` .. ``hvc3.sock``, so four execs at
once; a flock on ``hvcN.lock`` makes a console one caller's, across threads and processes). The
agent in the guest puts its tty in raw mode (no echo, no translation) and reads lines::

    host:  \\nX <token> <argv list> <stdin: "_" + base64, or "-" for none>\\n
    guest: <token> ack\\n
           <the command's output, raw bytes: stdout and stderr merged>
           \\x1e<token> <exit code>\\n

The token is 128 random bits in hex, after a record separator (0x1e) that text output does not
end in: output without a final newline, or binary output, stays exact, and only output that ends
in what could begin the marker is held back until the next bytes show it is not. Bytes written to a console
right after connecting can be lost under load, so the host resends the request (same token)
every second until acked; the agent ignores a repeat of the token it last took. Anything before
the ack (a previous caller's leftovers) is skipped. ``\\nK <token>\\n`` on another console
SIGKILLs the process group of the exec with that token (the host's exec timeout). The
command's standard input is the stdin bytes, or /dev/null; it is meant for small inputs (the
agent reads the request byte by byte). A daemon an exec leaves holding its output gets a second
after the command exits, then the exec ends without the rest of its output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import fcntl
import functools
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

import sandboxctl
from sandboxctl.events.limits import VM_MEMORY_MIN

# The least -m the guest boots with (measured: 96 boots and execs; 88 panics, out of memory).
MEMORY_MIN_MIB = VM_MEMORY_MIN >> 20
CONSOLES = 4  # virtio consoles, so this many execs run at once
GUEST_TERM = 3  # seconds the guest gives its processes after SIGTERM on a stop (sandboxctl.term)
CMDLINE_MAX = 2047  # the x86 kernel's COMMAND_LINE_SIZE, less its NUL
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
END = b"\x1e"  # what begins an exec's end marker (a record separator)
ACK_RESEND = 1.0  # seconds without an ack before an exec request is sent again
KILL_WAIT = 5.0  # seconds an exec's kill is tried for
ACK_WAIT = 30.0  # seconds an exec waits for its ack before the VM counts as unresponsive
READY_POLL = 0.002  # seconds between looks for the ready marker where the log cannot be watched
READY_LOOK = 1.0  # seconds between looks at the boot's deadline while the log is watched
IN_MODIFY = 0x2  # inotify: the file was written to
STOP_LOOK = 1.0  # seconds between a watcher's looks at whether it is to stop
EVENTS = ("SHUTDOWN", "RESET", "STOP", "RESUME", "POWERDOWN")
SOCKET_PATH_MAX = 107  # sun_path, less its NUL
# qemu runs at this niceness: a guest's vCPUs (under TCG each one a host core of emulation, at
# boot and whenever the guest computes) yield to the control plane and nats-server, whose answers
# must stay prompt however busy the sandboxes are. Idle cores are still the guests' to use.
NICE = 10

_EXIT = re.compile(rb"sandboxctl-exit (-?\d+)\r?\n")
_FAIL = re.compile(rb"sandboxctl-fail ([^\r\n]*)\r?\n")  # the whole line: qemu writes it a byte at a time
LOG_KEEP = 8 << 20  # bytes of serial log a boot keeps from the boots before (the last half, past it)
TAIL_BLOCK = 64 << 10  # bytes read at a time from a log's end for its last lines
POWER_DOWN = b"reboot: Power down"  # the kernel's last line when the guest powers itself off


class VMError(Exception):
    """A VM operation failed; the message is for the user, one or two lines."""


@dataclass(frozen=True)
class Guest:
    """The kernel and initramfs every VM boots (made by scripts/setup-vm.sh)."""

    kernel: Path
    initrd: Path

    @staticmethod
    def find(directory: Path) -> Guest:
        """The guest in ``directory``; ``VMError`` naming setup-vm.sh when it is not (all) there."""
        kernel, initrd = directory / "vmlinux", directory / "initramfs.cpio"
        if not kernel.is_file() or not initrd.is_file():
            raise VMError(f"no VM guest kernel in {directory}: run scripts/setup-vm.sh")
        return Guest(kernel, initrd)


def default_guest_dir() -> Path:
    """``$SANDBOXCTL_VM_GUEST``, else ``<repo>/.cache/vm``, where setup-vm.sh puts the guest."""
    configured = os.environ.get("SANDBOXCTL_VM_GUEST")
    if configured:
        return Path(configured)
    # sandboxctl/ is a real folder at the top of the repository (its subpackages are symlinks).
    return Path(sandboxctl.__file__).resolve().parent.parent / ".cache" / "vm"


def qemu_binary() -> str:
    """The qemu-system-x86_64 to run: ``$SANDBOXCTL_QEMU``, else the one on PATH. One that
    ``$SANDBOXCTL_QEMU`` names and is not there is missing (``VMError``): another is not taken
    in its stead."""
    configured = os.environ.get("SANDBOXCTL_QEMU")
    if configured:
        if not os.path.isfile(configured) or not os.access(configured, os.X_OK):
            raise VMError(
                f"qemu-system-x86_64 is not installed at {configured} (SANDBOXCTL_QEMU): run scripts/setup-vm.sh"
            )
        return configured
    found = shutil.which("qemu-system-x86_64")
    if not found:
        raise VMError("qemu-system-x86_64 is not installed: run scripts/setup-vm.sh")
    return found


@dataclass(frozen=True)
class MachineSpec:
    """What one boot runs: its disks (raw ext4 images labelled root, layer, workspace), size,
    command (empty: the VM idles until stopped), environment and accelerator (``accel.detect``)."""

    root: Path
    layer: Path
    workspace: Path
    cpus: int = 1
    memory_mib: int = 256
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    accel: str = "tcg"
    nice: int = NICE


def _item(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else os.fsencode(value)
    return "_" + base64.b64encode(raw).decode()


def _list(values: Sequence[str | bytes]) -> str:
    return ",".join(_item(v) for v in values)


@functools.cache
def _tsc_khz() -> int | None:
    """The host TSC in kHz, from /proc/cpuinfo: microvm under TCG cannot calibrate it and hangs.
    Read once per process, not on each boot's path."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                with contextlib.suppress(ValueError):
                    return int(float(value) * 1000)
    return None


def alive(pidfd: int) -> bool:
    return not select.select([pidfd], [], [], 0)[0]


def _wait_gone(pidfd: int, timeout: float | None) -> bool:
    """Wait until the process of ``pidfd`` has exited; whether it did within ``timeout``."""
    return bool(select.select([pidfd], [], [], timeout)[0])


def _inotify(path: Path) -> int:
    """An inotify descriptor (non-blocking) readable once ``path`` is written to; -1 where none
    can be had (no such call, or the watches of this user are used up)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return -1
    if fd < 0:
        return -1
    if int(libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY)) < 0:
        os.close(fd)
        return -1
    return fd


class Growth:
    """The bytes appended to a file from ``offset`` on, read as they come: ``wait`` returns once
    the file is written to (inotify), the process of ``pidfd`` ends or ``timeout`` passes. So
    the guest's ready marker is seen the moment qemu writes it, not at the next look of a poll,
    and a follower of the log has each line as it is written. Without inotify, ``wait`` is a
    poll of READY_POLL seconds."""

    PARTIAL_MAX = 4096  # the most of an unfinished line ``lines`` looks at again

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = path, offset
        self._partial = b""  # the last line read, while it has no end
        self._fd = -1
        self._notify = _inotify(path)

    def read(self) -> bytes:
        """What was written since the last read (since ``offset`` at first; the file may not
        exist yet)."""
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return b""
            os.lseek(self._fd, self.offset, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        new = b"".join(chunks)
        self.offset += len(new)
        return new

    def lines(self) -> bytes:
        """What was written since the last look, from the start of the line it continues (up to
        PARTIAL_MAX bytes of it): qemu writes the serial log a byte at a time, and a marker may
        come in several reads."""
        text = self._partial + self.read()
        self._partial = text[text.rfind(b"\n") + 1 :][-self.PARTIAL_MAX :]
        return text

    def wait(self, pidfd: int | None, timeout: float, poll: float = READY_POLL) -> None:
        """Until the file is written to, the process ends or ``timeout`` passes; without inotify,
        for ``poll`` seconds at most."""
        timeout = max(0.0, timeout)
        if self._notify < 0:
            if pidfd is None:
                time.sleep(min(timeout, poll))
            else:
                _wait_gone(pidfd, min(timeout, poll))
            return
        watched = [self._notify] if pidfd is None else [pidfd, self._notify]
        if self._notify in select.select(watched, [], [], min(timeout, READY_LOOK))[0]:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._notify, 4096):  # the events: only that there were some matters
                    pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        notify, self._fd, self._notify = self._notify, -1, -1
        if notify >= 0:
            # Closing an inotify descriptor that had a watch waits for the kernel to retire it
            # (an RCU grace period: 7 to 20 ms measured here), so it is closed off the boot's path.
            try:
                threading.Thread(target=os.close, args=(notify,), name="sandboxctl-inotify-close", daemon=True).start()
            except RuntimeError:  # no thread to be had: closed here, late rather than never
                os.close(notify)


def trim_log(path: Path, keep: int = LOG_KEEP) -> None:
    """Bound a log that is appended to across boots: one grown past ``keep`` bytes is cut to its
    last ``keep // 2`` from the start of a line. Called before qemu opens it, so no one writes
    meanwhile (a reader following the last boot keeps the file it had)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size <= keep:
        return
    with path.open("rb") as f:
        f.seek(size - keep // 2)
        kept = f.read()
    newline = kept.find(b"\n")
    if 0 <= newline < len(kept) - 1:
        kept = kept[newline + 1 :]
    tmp = path.with_name(path.name + ".trim")
    tmp.write_bytes(kept)
    tmp.replace(path)


def log_tail(path: Path, lines: int | None) -> tuple[bytes, int]:
    """The last ``lines`` lines of the log at ``path`` (all of it for None), and the offset its
    reading ended at (where a follower goes on from). Read from the end, a block at a time, each
    looked at once: a tail costs what it shows (and the lines' length), not the whole log."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return b"", 0
    with f:
        size = os.fstat(f.fileno()).st_size
        if lines is None:
            return f.read(size), size
        if lines <= 0:
            return b"", size
        blocks: list[bytes] = []
        start, newlines = size, 0
        # one newline more than the lines wanted (the last line's own end counts when it has one)
        while start > 0 and newlines <= lines:
            step = min(TAIL_BLOCK, start)
            start -= step
            f.seek(start)
            block = f.read(step)
            blocks.append(block)
            newlines += block.count(b"\n")
        data = b"".join(reversed(blocks))
        cut = len(data)
        for _ in range(lines + 1 if data.endswith(b"\n") else lines):
            cut = data.rfind(b"\n", 0, cut)
            if cut < 0:
                break
        return data[cut + 1 :], size


def _run_private(coro: Any, timeout: float) -> Any:
    """Run ``coro`` on a loop of its own: QMP must not touch (or need) the calling thread's loop."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


class Machine:
    """One VM: its qemu process, QMP socket, console sockets, serial log and pidfile, all inside
    `directory` (created 0700).

    Any number of ``Machine`` objects, in any threads or processes, may stand for the same
    directory: all state is in its files, and what must be one caller's at a time (a console,
    the QMP command socket) is held by a flock there. One ``watch`` at a time per VM.
    """

    def __init__(self, directory: Path, guest: Guest, qemu: str | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.guest = guest
        self._qemu = qemu

    # --- files ---------------------------------------------------------------------------------

    def logs(self) -> Path:
        """The serial log: the sandbox's output and the guest's markers, appended across boots."""
        return self.directory / "serial.log"

    def _boot_record(self) -> dict[str, Any]:
        try:
            record = json.loads((self.directory / "boot.json").read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _log_since_boot(self) -> bytes:
        offset = int(self._boot_record().get("offset", 0))
        try:
            with open(self.logs(), "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    @contextlib.contextmanager
    def _socket_path(self, name: str) -> Iterator[str]:
        """A path to connect to ``name`` in the directory, short enough for sun_path however deep
        the directory is (through /proc/self/fd when it is not)."""
        path = str(self.directory / name)
        if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
            yield path
            return
        dirfd = os.open(self.directory, os.O_PATH | os.O_DIRECTORY)
        try:
            yield f"/proc/self/fd/{dirfd}/{name}"
        finally:
            os.close(dirfd)

    @contextlib.contextmanager
    def _flock(self, name: str, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # --- the process ---------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The live qemu of this directory (by its pidfile, checked against /proc/<pid>/cmdline so a
        reused pid is not taken for it), else None."""
        try:
            pid = int((self.directory / "qemu.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        return pid if os.fsencode(str(self.directory) + "/") in cmdline else None

    def pidfd(self) -> int | None:
        """A pidfd of the running qemu (the caller closes it), None when none runs."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if self.pid() != pid:  # it exited and the pid was reused between the two looks
            os.close(fd)
            return None
        return fd

    def started_at(self) -> str:
        """The id of the current or last boot (a fresh random one each boot), "" if never booted."""
        return str(self._boot_record().get("boot", ""))

    def booted_at(self) -> str:
        """When the current or last boot began, as podman and docker write a container's start
        (RFC 3339, UTC, nanoseconds), so that runs sort by it; "" if never booted."""
        record = self._boot_record()
        started = record.get("started")
        if isinstance(started, str) and started:
            return started
        when = record.get("time")  # a boot recorded before "started" was
        return _rfc3339(int(when * 1e9)) if isinstance(when, int | float) else ""

    def forget_boots(self) -> None:
        """Forget the last boot (its id and exit), as a VM made anew has none; the log stays."""
        if self.pid() is not None:
            raise VMError(f"the VM in {self.directory} is running: its boot is not forgotten")
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "boot.json").unlink()

    def ready(self) -> bool:
        """Whether the current or last boot's guest said it was ready (its disks mounted, its exec
        agents listening): a VM still booting is running, but not yet ready for anything."""
        boot = self.started_at()
        return (
            bool(boot) and re.search(rb"sandboxctl-ready " + boot.encode() + rb"\b", self._log_since_boot()) is not None
        )

    def exit_code(self) -> int | None:
        """The command's exit code from the last boot's ``sandboxctl-exit`` marker, if it ended by
        itself (a stop that ends it reports none)."""
        found = _EXIT.findall(self._log_since_boot())
        return int(found[-1]) if found else None

    def powered_off(self) -> bool:
        """Whether the last boot's guest powered itself off (the kernel's last words, "reboot: Power
        down", the last line of its serial log, after its processes were ended and its disks
        unmounted): the end of a stop, by whoever pressed its power button, or of its command. A
        kill, a crash or a panic never is."""
        return self._log_since_boot().rstrip().endswith(POWER_DOWN)

    def kill(self) -> None:
        """SIGKILL the qemu and return once it is gone (the guest gets no chance to unmount)."""
        pidfd = self.pidfd()
        if pidfd is None:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_gone(pidfd, None)
        finally:
            os.close(pidfd)

    def boot(self, spec: MachineSpec, timeout: float = 60.0, launched: Callable[[], None] | None = None) -> int:
        """Start the VM (qemu daemonized, outliving the caller) and return its pid once the guest
        prints this boot's ready marker (seen as qemu writes it to the serial log); ``launched`` is
        called once qemu runs, before the guest is ready (to begin watching it meanwhile).
        ``VMError`` (with qemu's complaint or the last serial lines) if qemu refuses, the guest
        fails (too little memory: a kernel panic) or the timeout passes; the qemu is killed then."""
        if self.pid() is not None:
            raise VMError(f"the VM in {self.directory} is already running")
        if spec.memory_mib < MEMORY_MIN_MIB:
            raise VMError(f"a VM needs at least {MEMORY_MIN_MIB} MiB of memory, not {spec.memory_mib}")
        if spec.cpus < 1:
            raise VMError(f"a VM needs at least one CPU, not {spec.cpus}")
        if not 0 <= spec.nice <= 19:
            raise VMError(f"a VM's niceness is 0 to 19, not {spec.nice}")
        if spec.accel not in ("kvm", "tcg"):
            raise VMError(f"unknown VM accelerator {spec.accel!r}: use kvm or tcg")
        for disk in (spec.root, spec.layer, spec.workspace):
            if not Path(disk).is_file():
                raise VMError(f"VM disk {disk} does not exist")
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        boot_id = secrets.token_hex(8)
        cmdline = self._cmdline(spec, boot_id)
        qemu = self._qemu or qemu_binary()
        for name in ("qemu.pid", *(f"hvc{n}.sock" for n in range(CONSOLES)), "qmp.sock", "events.sock"):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
        trim_log(self.logs())
        try:
            offset = self.logs().stat().st_size
        except FileNotFoundError:
            offset = 0
        now = time.time_ns()
        record = {"boot": boot_id, "offset": offset, "time": now / 1e9, "started": _rfc3339(now)}
        tmp = self.directory / "boot.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.directory / "boot.json")

        argv = [*(["nice", "-n", str(spec.nice)] if spec.nice else []), qemu, *self._qemu_args(spec, cmdline)]
        try:
            done = subprocess.run(
                argv, cwd=self.directory, capture_output=True, text=True, timeout=30, start_new_session=True
            )
        except subprocess.TimeoutExpired as e:
            raise VMError(f"qemu did not start within 30 s: {(e.stderr or '')!s:.300}") from None
        if done.returncode != 0:
            complaint = " ".join((done.stderr or done.stdout).split())[:400]
            raise VMError(f"qemu refused to start the VM: {complaint}")
        pid, pidfd = self.pid(), self.pidfd()
        if pid is None or pidfd is None:
            raise VMError(f"the VM stopped while booting: {self._tail()}")
        try:
            log = Growth(self.logs(), offset)  # watched before the first read: no write is missed
            try:
                if launched is not None:
                    launched()
                deadline = time.monotonic() + timeout
                ready = re.compile(rb"sandboxctl-ready " + boot_id.encode() + rb"\b")
                while True:
                    fresh = log.lines()
                    if ready.search(fresh):
                        return pid  # (a short command may have ended and powered off already)
                    failed = _FAIL.search(fresh)
                    if failed:
                        self._kill_fd(pidfd)
                        raise VMError(f"the VM failed to start: {failed.group(1).decode(errors='replace')}")
                    if not alive(pidfd):
                        if ready.search(log.lines()):  # it wrote the marker, then ended, since the read
                            return pid
                        raise VMError(f"the VM stopped while booting: {self._tail()}")
                    if time.monotonic() > deadline:
                        self._kill_fd(pidfd)
                        raise VMError(f"the VM did not become ready within {timeout:g} s: {self._tail()}")
                    log.wait(pidfd, deadline - time.monotonic())
            finally:
                log.close()
        finally:
            os.close(pidfd)

    def _kill_fd(self, pidfd: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _wait_gone(pidfd, 10)

    def _tail(self, lines: int = 3) -> str:
        """What the serial log says went wrong: a kernel panic and its cause when there is one
        (their last lines are only a stack trace), else the last few lines."""
        text = self._log_since_boot().decode(errors="replace").replace("\r", "")
        found = [line.strip() for line in text.splitlines() if line.strip()]
        telling = [line for line in found if "Kernel panic" in line or "Out of memory" in line][-2:]
        kept = telling or found[-lines:]
        return " | ".join(kept)[-600:] if kept else "(no serial output; too little memory?)"

    def _cmdline(self, spec: MachineSpec, boot_id: str) -> str:
        env = dict(spec.env)
        for name in env:
            if not name or "=" in name or "\0" in name:
                raise VMError(f"invalid environment variable name {name!r}")
        if any("\0" in v for v in env.values()) or any("\0" in a for a in spec.command):
            raise VMError("the command and environment cannot contain NUL bytes")
        env.setdefault("PATH", DEFAULT_PATH)
        parts = ["console=ttyS0", "quiet", "pci=off", "panic=-1"]
        khz = _tsc_khz() if spec.accel == "tcg" else None
        if khz:
            parts.append(f"tsc_early_khz={khz}")
        parts += [f"sandboxctl.boot={boot_id}", f"sandboxctl.term={GUEST_TERM}", f"sandboxctl.consoles={CONSOLES}"]
        parts.append("sandboxctl.env=" + _list([f"{k}={v}" for k, v in env.items()]))
        if spec.command:
            parts.append("sandboxctl.cmd=" + _list(spec.command))
        cmdline = " ".join(parts)
        if len(cmdline) > CMDLINE_MAX:
            raise VMError(
                f"the command and environment are too long for a VM: {len(cmdline)} bytes encoded,"
                f" the kernel command line holds {CMDLINE_MAX}"
            )
        return cmdline

    def _qemu_args(self, spec: MachineSpec, cmdline: str) -> list[str]:
        d = str(self.directory)
        args = ["-name", "sandboxctl", "-M", "microvm,acpi=on,pit=on,rtc=on"]
        args += ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", "tcg"]
        args += ["-smp", str(spec.cpus), "-m", str(spec.memory_mib)]
        args += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
        args += ["-kernel", str(self.guest.kernel), "-initrd", str(self.guest.initrd), "-append", cmdline]
        for name, path, readonly in (
            ("root", spec.root, True),
            ("layer", spec.layer, False),
            ("workspace", spec.workspace, False),
        ):
            drive = f"id={name},file={_opt(str(Path(path).resolve()))},format=raw,if=none,aio=threads"
            args += [
                "-drive",
                drive + (",readonly=on" if readonly else ""),
                "-device",
                f"virtio-blk-device,drive={name}",
            ]
        args += ["-device", "virtio-serial-device"]
        for n in range(CONSOLES):
            # Relative socket paths (qemu runs in the directory): sun_path holds 107 bytes only.
            args += ["-chardev", f"socket,id=hvc{n},path=hvc{n}.sock,server=on,wait=off"]
            args += ["-device", f"virtconsole,chardev=hvc{n}"]
        args += ["-chardev", f"file,id=serial,path={_opt(d + '/serial.log')},append=on", "-serial", "chardev:serial"]
        args += ["-chardev", "socket,id=qmp,path=qmp.sock,server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
        args += [
            "-chardev",
            "socket,id=events,path=events.sock,server=on,wait=off",
            "-mon",
            "chardev=events,mode=control",
        ]
        args += ["-pidfile", d + "/qemu.pid", "-daemonize"]
        return args

    # --- QMP -----------------------------------------------------------------------------------

    def _qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command on the command socket (one caller at a time: a flock)."""
        if self.pid() is None:
            raise VMError("the VM is not running")

        async def run(path: str) -> Any:
            client = QMPClient("sandboxctl")
            try:
                await client.connect(path)
                return await client.execute(command, arguments or None)
            finally:
                await client.disconnect()

        with self._flock("qmp.lock"), self._socket_path("qmp.sock") as path:
            try:
                return _run_private(run(path), 10.0)
            except Exception as e:  # qemu.qmp raises many kinds; the VM may be exiting
                if self.pid() is None:
                    raise VMError("the VM is not running") from None
                raise VMError(f"QMP {command} failed: {e or type(e).__name__}") from None

    def pause(self) -> None:
        """Freeze the VM's CPUs (QMP stop); its memory stays."""
        self._qmp("stop")

    def resume(self) -> None:
        """Let a paused VM run again (QMP cont)."""
        self._qmp("cont")

    def paused(self) -> bool:
        """Whether the VM is paused (QMP query-status); ``VMError`` if it is not running at all."""
        status = self._qmp("query-status")
        return not bool(status.get("running")) and status.get("status") == "paused"

    def powerdown(self, grace: float) -> None:
        """Stop the VM cleanly: press its power button (the guest ends its processes, unmounts and
        powers off), wait up to ``grace`` seconds for qemu to exit, then QMP quit, then SIGKILL.
        Returns once qemu is gone; no-op if it is not running. A grace of GUEST_TERM + 2 s or more
        lets the guest finish unmounting even when its command ignores SIGTERM."""
        pidfd = self.pidfd()
        if pidfd is None:
            return
        try:
            with contextlib.suppress(VMError):
                if self.paused():
                    self.resume()
            with contextlib.suppress(VMError):
                self._qmp("system_powerdown")
            if _wait_gone(pidfd, max(0.0, grace)):
                return
            with contextlib.suppress(VMError):
                self._qmp("quit")
            if _wait_gone(pidfd, 2.0):
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_gone(pidfd, None)
        finally:
            os.close(pidfd)

    def watch(self, stop: threading.Event) -> Iterator[str]:
        """Yield the VM's QMP events ("SHUTDOWN", "RESET", "STOP", "RESUME", "POWERDOWN") as they
        happen, then "EXITED" once the qemu process is gone (seen through a pidfd, so within
        milliseconds of a kill -9). Ends after "EXITED", or within STOP_LOOK seconds of ``stop``
        being set: a watcher wakes only for its VM's news and that look, not to take the
        interpreter's lock from the control plane's hops every few milliseconds."""
        pidfd = self.pidfd()
        if pidfd is None:
            yield "EXITED"
            return
        loop = asyncio.new_event_loop()
        client: QMPClient | None = QMPClient("sandboxctl-watch")
        try:
            try:
                with self._socket_path("events.sock") as path:
                    loop.run_until_complete(asyncio.wait_for(client.connect(path), 5.0))  # type: ignore[union-attr]
            except Exception:  # qemu exiting, or another watcher has the socket: the pidfd still tells
                client = None
            exited = loop.create_future()

            def gone() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, gone)

            async def next_event() -> str | None:
                """The next event's name, "EXITED", or None after STOP_LOOK seconds (to look at ``stop``)."""
                waits: list[asyncio.Future[Any]] = [exited]
                getter = None
                if client is not None:
                    getter = asyncio.ensure_future(client.events.get())
                    waits.append(getter)
                done, _ = await asyncio.wait(waits, timeout=STOP_LOOK, return_when=asyncio.FIRST_COMPLETED)
                if getter is not None and getter in done:
                    return str(getter.result()["event"])
                if getter is not None:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                return "EXITED" if exited in done else None

            while not stop.is_set():
                name = loop.run_until_complete(next_event())
                if name == "EXITED":
                    if client is not None:  # events qemu sent just before it went
                        for message in client.events.clear():
                            if str(message["event"]) in EVENTS:
                                yield str(message["event"])
                    yield "EXITED"
                    return
                if name in EVENTS:
                    yield name
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(pidfd)
            if client is not None:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.wait_for(client.disconnect(), 2.0))
            loop.close()
            os.close(pidfd)

    # --- exec ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _console(self, deadline: float | None) -> Iterator[int]:
        """Hold a free console (its flock) for the duration; wait for one while all are taken."""
        while True:
            for n in range(CONSOLES):
                with self._flock(f"hvc{n}.lock", blocking=False) as held:
                    if held:
                        yield n
                        return
            if self.pid() is None:
                raise VMError("the VM is not running")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("every console of the VM stayed busy until the exec's timeout")
            time.sleep(0.05)

    def _connect(self, n: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with self._socket_path(f"hvc{n}.sock") as path:
                sock.connect(path)
        except OSError as e:
            sock.close()
            if self.pid() is None:
                raise VMError("the VM is not running") from None
            raise VMError(f"cannot reach the VM's console {n}: {e.strerror or e}") from None
        return sock

    def exec(
        self,
        argv: Sequence[str],
        output: Callable[[int, bytes], None],
        stdin: bytes | None = None,
        timeout: float | None = None,
        abort: threading.Event | None = None,
    ) -> int:
        """Run ``argv`` in the sandbox (chrooted in its root, cwd /workspace, the boot's environment)
        and return its exit code, calling ``output(1, chunk)`` as output arrives (stdout and stderr
        merged, as fd 1). ``stdin`` is its whole standard input (else /dev/null). ``VMError`` if the
        VM is not running or stops meanwhile, or ``abort`` is set; ``TimeoutError`` after ``timeout``
        seconds. Whatever ends the exec early (those, or ``output`` raising: a closed pipe), the
        command's process group is killed first: it never goes on alone."""
        stdin_field = "-" if stdin is None else _item(stdin)
        return self._conversation("X", argv, stdin_field, output, timeout, abort)

    def session(
        self, argv: Sequence[str], terminal: int, output: Callable[[int, bytes], None], rows: int, cols: int
    ) -> int:
        """Run ``argv`` with a free console of the guest as its terminal (``sandboxctl shell``):
        cooked, with echo, line editing and signals done by the guest's tty, sized ``rows`` by
        ``cols``. What is read from the file descriptor ``terminal`` goes to it as typed, its end
        as the terminal's end of file (^D); what the console shows goes to ``output(1, chunk)``.
        Returns the command's exit code; what ends the session early kills the command, as an
        exec's does."""
        return self._conversation("I", argv, f"{int(rows)} {int(cols)}", output, None, None, terminal)

    def _conversation(
        self,
        kind: str,
        argv: Sequence[str],
        tail: str,
        output: Callable[[int, bytes], None],
        timeout: float | None,
        abort: threading.Event | None,
        terminal: int = -1,
    ) -> int:
        """One request of ``kind`` (X, an exec; I, a session) for ``argv`` to the agent on a free
        console, its fields after the command ``tail``, seen to its end marker (``_converse``)."""
        if not argv:
            raise VMError("exec needs a command")
        if any("\0" in a for a in argv):
            raise VMError("the command cannot contain NUL bytes")
        pidfd = self.pidfd()
        if pidfd is None:
            raise VMError("the VM is not running")
        deadline = None if timeout is None else time.monotonic() + timeout
        token = secrets.token_hex(16)
        request = f"\n{kind} {token} {_list(list(argv))} {tail}\n".encode()
        try:
            with self._console(deadline) as n, contextlib.closing(self._connect(n)) as sock:
                try:
                    return self._converse(sock, pidfd, token.encode(), request, output, deadline, abort, terminal)
                except BaseException as exc:
                    # Our reader went away, an abort, a timeout: the command must not go on. The kill
                    # goes through another console while this one is still held (its agent is busy).
                    if not (isinstance(exc, VMError) and self.pid() is None):
                        self._kill_exec(token)
                    raise
        finally:
            os.close(pidfd)

    def _converse(
        self,
        sock: socket.socket,
        pidfd: int,
        token: bytes,
        request: bytes,
        output: Callable[[int, bytes], None],
        deadline: float | None,
        abort: threading.Event | None = None,
        terminal: int = -1,
    ) -> int:
        """Send ``request`` until the agent acks it, then pass on the command's output until its end
        marker, and (``terminal`` >= 0) what is typed to the console meanwhile."""
        ack = token + b" ack\n"
        end = END + token + b" "
        buf = b""
        acked = False
        sent_at = -ACK_RESEND
        first_send = time.monotonic()
        while True:
            now = time.monotonic()
            if not acked and now - sent_at >= ACK_RESEND:
                if now - first_send > ACK_WAIT:
                    raise VMError(f"the VM's exec agent did not answer within {ACK_WAIT:g} s")
                sock.sendall(request)
                sent_at = now
            if deadline is not None and now > deadline:
                raise TimeoutError("the command did not finish before the exec's timeout; it was killed")
            if abort is not None and abort.is_set():
                raise VMError("the exec was ended; its command was killed")
            wait = 0.2 if acked else max(0.01, sent_at + ACK_RESEND - now)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            typed = [terminal] if acked and terminal >= 0 else []
            readable = select.select([sock.fileno(), pidfd, *typed], [], [], wait)[0]
            if pidfd in readable:
                raise VMError("the VM stopped during the exec")
            if typed and terminal in readable:
                data = os.read(terminal, 65536)
                # The end of input is the terminal's end of file (^D), which the guest's tty gives
                # the command; its output is still shown until it ends.
                sock.sendall(data or b"\x04")
                if not data:
                    terminal = -1
            if sock.fileno() not in readable:
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise VMError("the VM's console closed during the exec")
            buf += chunk
            if not acked:
                at = buf.find(ack)
                if at < 0:
                    if token + b" bad\n" in buf:
                        raise VMError("the VM's exec agent rejected the request")
                    buf = buf[-(len(ack) - 1) :]  # leftovers of an earlier caller; keep what may begin the ack
                    continue
                acked = True
                buf = buf[at + len(ack) :]
            at = buf.find(end)
            if at >= 0:
                newline = buf.find(b"\n", at + len(end))
                if newline >= 0:
                    if at:
                        output(1, buf[:at])
                    try:
                        return int(buf[at + len(end) : newline])
                    except ValueError:
                        raise VMError("the VM's exec agent sent a malformed exit marker") from None
                if at:
                    output(1, buf[:at])
                    buf = buf[at:]
                continue
            keep = _marker_start(buf, end)  # what may be the beginning of the end marker waits
            if len(buf) > keep:
                output(1, buf[: len(buf) - keep])
                buf = buf[len(buf) - keep :]

    def _kill_exec(self, token: str) -> None:
        """Best effort: SIGKILL the process group of the exec ``token`` through another console,
        sent again each second (a request can be lost just after connecting) until the agent says
        it was done, for at most KILL_WAIT seconds."""
        done = f"{token} killed\n".encode()
        deadline = time.monotonic() + KILL_WAIT
        with contextlib.suppress(VMError, TimeoutError, OSError), self._console(deadline) as n:
            with contextlib.closing(self._connect(n)) as sock:
                heard = b""
                while time.monotonic() < deadline and done not in heard:
                    sock.sendall(f"\nK {token}\n".encode())
                    until = min(deadline, time.monotonic() + ACK_RESEND)
                    while done not in heard and (left := until - time.monotonic()) > 0:
                        if not select.select([sock], [], [], left)[0]:
                            break
                        chunk = sock.recv(4096)
                        if not chunk:
                            return
                        heard = (heard + chunk)[-4096:]


def _rfc3339(ns: int) -> str:
    """A time in nanoseconds since the epoch as RFC 3339 in UTC, with all nine digits."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def _marker_start(buf: bytes, end: bytes) -> int:
    """The length of the longest tail of ``buf`` that begins ``end`` (only a tail from the marker's
    first byte on can): those bytes wait, the rest is output now."""
    at = buf.find(end[:1], max(0, len(buf) - (len(end) - 1)))
    while at >= 0:
        if end.startswith(buf[at:]):
            return len(buf) - at
        at = buf.find(end[:1], at + 1)
    return 0


def _opt(value: str) -> str:
    """A value for a qemu -drive/-chardev option: commas are doubled there."""
    return value.replace(",", ",,")
