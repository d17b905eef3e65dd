"""The VM driver's disks: ext4 images a microVM boots from, made and checked on the host.

A VM sandbox has three disks, found by the guest's init through their ext4 labels:

- **root** (``LABEL_ROOT``): the image's root filesystem, built once per image id and cached as
  ``<cache_dir>/<image id>.ext4`` (mode 0444), shared read-only by every VM of that image;
- **layer** (``LABEL_LAYER``): a VM's writable layer over root, which may be remade empty;
- **workspace** (``LABEL_WORKSPACE``): the sandbox's files, which nothing here ever remakes.

Everything is synchronous (the driver calls it from worker threads) and bounded: every tool runs
under a timeout, and a missing tool is named with the script that installs it. A failure is a
``DiskError`` whose text is the tool's own message, and leaves nothing half-made behind: a disk
is written under a temporary name and renamed into place only when complete.

The root disk is built from ``podman export`` of a throwaway container of the image, unpacked
as root into a directory inside ``cache_dir``. The tar comes from an image, that is from whoever
published it, so each member is checked before it is written (``_safe_member``): it must land
inside that directory, through no symlink, and may not replace a directory; a hard link may
only link a regular file already unpacked; device nodes are skipped (the guest mounts its own
``/dev``). Modes (setuid, sticky), numeric owners and symlinks, absolute or not, are kept: they
are the image's and the guest needs them. Extended attributes (file capabilities) are not kept.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LABEL_ROOT = "root"
LABEL_LAYER = "layer"
LABEL_WORKSPACE = "workspace"

MIB = 1 << 20
WORKSPACE_SIZE = 1 << 30  # sparse: only what the guest writes takes space
LAYER_SIZE = 1 << 30  # sparse
ROOT_MIN_SIZE = 64 * MIB
SPARE_SIZES = {LABEL_WORKSPACE: WORKSPACE_SIZE, LABEL_LAYER: LAYER_SIZE}  # the disks Spares makes ahead
SPARES = 2  # of each, so that two creates in a row both find one
SPARE_FORMAT = 1  # in a spare's name: a blank disk made otherwise (mkfs options, root mode) is another format
SPARES_MAX = 64
FILL_DELAY = 0.5  # seconds a fill waits after a take, so as not to compete with that VM's launch

# Seconds each tool may take. A root build holds its image's lock for at most about
# EXPORT_TIMEOUT + MKFS_TIMEOUT + 2 * ENGINE_TIMEOUT, so a waiter gives up after LOCK_TIMEOUT.
ENGINE_TIMEOUT = 60.0  # podman image inspect, create, rm
EXPORT_TIMEOUT = 300.0  # podman export and unpacking it
MKFS_TIMEOUT = 300.0
FSCK_TIMEOUT = 120.0
DEBUGFS_TIMEOUT = 60.0
LOCK_TIMEOUT = EXPORT_TIMEOUT + MKFS_TIMEOUT + 4 * ENGINE_TIMEOUT

MKFS = "mkfs.ext4"  # the tools, by name on PATH
E2FSCK = "e2fsck"
DEBUGFS = "debugfs"
BUILD_LABEL = "sandboxctl.vm-disk-build"  # set on the throwaway containers a root build makes

_ENGINES = ("podman", "docker")  # a missing engine is installed by scripts/setup-engines.sh, a tool by setup-vm.sh
_IMAGE_ID = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_MISSING_IMAGE = ("image not known", "no such image", "failed to find image")
_MESSAGE_LINES = 6


class DiskError(Exception):
    """A disk could not be made or checked; str() is the tool's own message (e.g. e2fsck's),
    one to a few lines, prefixed with what was being done."""


@dataclass(frozen=True)
class ImageInfo:
    """What the engine's storage says of an image: its id, and the command (entrypoint then cmd)
    and environment a container of it would run with."""

    id: str  # 64 hex digits
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def image_info(image: str, engine: Sequence[str] = ("podman",)) -> ImageInfo:
    """``image`` as the engine's local storage has it (one ``image inspect``); never pulls.

    ``engine`` is the engine's command line and its connection flags, e.g. ``("podman",)`` or
    ``("podman", "--url", "unix:///run/podman.sock")``. Raises DiskError, with the engine's
    message, if the image is not there or the engine cannot be asked or answers nonsense.
    """
    result = _run([*engine, "image", "inspect", "--format", "json", image], ENGINE_TIMEOUT, f"image {image}")
    if result.returncode != 0:
        message = _message(result)
        if any(marker in message.lower() for marker in _MISSING_IMAGE):
            raise DiskError(f"image {image} is not in {_tool_name(engine)}'s storage: {message}")
        raise DiskError(f"image {image}: {_tool_name(engine)} image inspect failed: {message}")
    try:
        found = json.loads(result.stdout)
        described = found[0] if isinstance(found, list) and found else {}
        match = _IMAGE_ID.fullmatch(str(described.get("Id", "")))
        config = described.get("Config") or {}
        command = [str(a) for a in (config.get("Entrypoint") or []) + (config.get("Cmd") or [])]
        env = dict(str(e).split("=", 1) for e in config.get("Env") or [] if "=" in str(e))
    except (ValueError, AttributeError, TypeError) as exc:
        raise DiskError(f"image {image}: {_tool_name(engine)} image inspect gave no image: {exc}") from exc
    if match is None:
        raise DiskError(f"image {image}: {_tool_name(engine)} gave no image id: {result.stdout.strip()[:200]!r}")
    return ImageInfo(match.group(1), command, env)


class ImageIndex:
    """``image_info``, kept for each image name while the engine's own index of its images is
    unchanged: podman's ``images.json`` in its storage, which it writes anew (a new file renamed
    into place) whenever an image is added, removed, tagged or untagged. A create of a VM from
    an image it knows then costs a stat, not an ``image inspect`` process (about 100 ms). Where
    the index cannot be found (an engine reached by URL, another storage driver's layout) every
    call asks the engine."""

    def __init__(self, engine: Sequence[str] = ("podman",)) -> None:
        self.engine = tuple(engine)
        self._lock = threading.Lock()
        self._index: Path | None = None
        self._resolved = False
        self._known: dict[str, tuple[tuple[int, int, int], ImageInfo]] = {}

    def info(self, image: str) -> ImageInfo:
        stamp = self._stamp()
        with self._lock:
            known = self._known.get(image)
        if stamp is not None and known is not None and known[0] == stamp:
            return known[1]
        found = image_info(image, self.engine)
        if stamp is not None and self._stamp() == stamp:  # unchanged while it was asked: it holds
            with self._lock:
                self._known[image] = (stamp, found)
        return found

    def _stamp(self) -> tuple[int, int, int] | None:
        """The index file's identity (inode, modification time, size), None where there is none."""
        if not self._resolved:
            self._index, self._resolved = self._find_index(), True
        if self._index is None:
            return None
        try:
            st = os.stat(self._index)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _find_index(self) -> Path | None:
        if len(self.engine) != 1 or _tool_name(self.engine) != "podman":
            return None  # reached by URL, or another engine: its files are not this machine's to read
        result = _run(
            [*self.engine, "info", "--format", "{{.Store.GraphRoot}}\t{{.Store.GraphDriverName}}"],
            ENGINE_TIMEOUT,
            "podman info",
            check_timeout=False,
        )
        root, _, driver = result.stdout.strip().partition("\t")
        if result.returncode != 0 or not root or not driver:
            return None
        index = Path(root) / f"{driver}-images" / "images.json"
        return index if index.is_file() else None


def root_disk(image: str, cache_dir: Path, engine: Sequence[str] = ("podman",), info: ImageInfo | None = None) -> Path:
    """The image's root filesystem as an ext4 disk labelled ``LABEL_ROOT``: ``cache_dir/<image id>.ext4``.

    Built once per image id, and shared read-only (mode 0444) by every VM of that image; a disk
    found in place is complete, since one is only ever renamed there whole. Callers in other
    threads or processes wait on a lock file per image id (``<image id>.lock``) rather than build
    it again. A failure raises DiskError naming the image, with the tool's message, and leaves no
    temporary file, directory or throwaway container behind. ``info``: the image as
    ``image_info`` found it already (else it is asked).
    """
    ident = (info or image_info(image, engine)).id
    disk = cache_dir / f"{ident}.ext4"
    if disk.exists():
        return disk
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskError(f"image {image}: cannot make the disk cache {cache_dir}: {exc}") from exc
    with _locked(cache_dir / f"{ident}.lock", f"image {image}"):
        if disk.exists():
            return disk
        _remove_leftovers(cache_dir, ident)
        _build_root(image, ident, disk, engine)
    return disk


def make_workspace(path: Path, size: int = WORKSPACE_SIZE) -> None:
    """Make a new sparse ext4 disk of ``size`` bytes at ``path``, labelled ``LABEL_WORKSPACE``, whose
    root directory (mode 0777, owned by root) any guest user can write in.

    A workspace holds a sandbox's files, so an existing file at ``path`` is never replaced:
    DiskError instead, and the file is left as it was (the check and the placing are one atomic
    hard link, so two callers cannot both succeed).
    """
    if os.path.lexists(path):
        raise DiskError(f"workspace {path} already exists: a workspace is never made over another")
    with _scratch(path) as tmp:
        _mkfs(tmp, size, LABEL_WORKSPACE, f"workspace {path}")
        _open_root_dir(tmp, f"workspace {path}")
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise DiskError(f"workspace {path} already exists: a workspace is never made over another") from exc
        except OSError as exc:
            raise DiskError(f"workspace {path}: {exc}") from exc
    sync_dir(path.parent)


def make_disks(workspace: Path, layer: Path, spares: Spares | None = None, sync: bool = True) -> None:
    """A new VM's disks: its workspace (``make_workspace``), unless one is at ``workspace``
    already (a sandbox's files are never made anew), and a fresh layer (``make_layer``). Each
    is a spare from ``spares`` where one is at hand (``Spares.take``), made here otherwise.
    ``sync=False`` leaves the placing of spares to be made durable by the caller (``sync_dir``
    of their directory), which must do so before it tells anyone the disks are there.

    What is made here is made at once, the layer on a thread of its own: each is a few short
    processes (mkfs, debugfs) that mostly wait on the kernel, so together they take little more
    than the workspace alone. Both are finished, made or failed, when this returns; DiskError is
    the workspace's if both failed."""
    # What a make or a take killed in the middle left beside the disks (``_scratch``, ``Spares.take``):
    # a half-made disk, a blank one not yet placed, a second name of the one placed. A create's own
    # directory: no other make or take works in it.
    for disk in (workspace, layer):
        _remove_leftovers(disk.parent, disk.name)
    need_workspace = not workspace.exists()
    took = need_workspace and spares is not None and spares.take(LABEL_WORKSPACE, workspace, sync=False)
    need_workspace = need_workspace and not took
    if spares is not None and spares.take(LABEL_LAYER, layer, sync=False):
        if need_workspace:
            make_workspace(workspace)
        if sync:
            sync_dir(layer.parent)  # the placings made durable, both at once when in one directory
        if sync and layer.parent != workspace.parent and took:
            sync_dir(workspace.parent)
        return
    if took and sync:
        sync_dir(workspace.parent)
    if not need_workspace:
        make_layer(layer)
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandboxctl-disk") as pool:
        layer_made = pool.submit(make_layer, layer)
        try:
            make_workspace(workspace)
        finally:
            layer_failed = layer_made.exception()
    if layer_failed is not None:
        raise layer_failed


class Spares:
    """Blank disks made ahead, so that a create need not wait for mkfs: up to ``count``
    workspaces and ``count`` layers of today's sizes (``SPARE_SIZES``) in ``directory``.

    A spare is blank and belongs to no sandbox. Each is made whole under a temporary name and
    renamed in, so a disk under a spare's name is always complete. ``take`` moves one out of
    ``directory`` with one atomic rename (two takers, threads or processes, never get the same
    disk) into the sandbox's directory, and places it as ``make_workspace`` or ``make_layer``
    would place a new one: a workspace never over another.

    The spares are made on a thread of the driver's (``start``, from the worker's driver
    alone), woken after each take. It waits ``FILL_DELAY`` first, so that its mkfs does not
    compete with the launch of the VM that took the disk, and makes one disk at a time under a
    lock of ``directory``. A spare's name carries its format (``SPARE_FORMAT``) and size: one of
    another (an older version's) is never taken and is removed by the next fill. A fill that
    fails is logged and tried again at the next take; a create then makes its own disks, as
    with no spares at all (``count`` 0).
    """

    def __init__(self, directory: Path, count: int = SPARES) -> None:
        if not 0 <= count <= SPARES_MAX:
            raise ValueError(f"a VM driver keeps 0 to {SPARES_MAX} spares of each disk, not {count}")
        self.directory = directory
        self.count = count
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, label: str, path: Path, sync: bool = True) -> bool:
        """Place a spare disk labelled ``label`` (LABEL_WORKSPACE or LABEL_LAYER) at ``path``;
        False when none is at hand (the caller makes one). DiskError if a workspace is at
        ``path`` already. ``sync``: make the placing durable (else the caller syncs ``path``'s
        directory itself)."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if _spare_label(n) == label)
        except OSError:
            names = []
        try:
            for name in names:
                # A layer in one rename, which replaces one at ``path``. A workspace is never
                # placed over another, so it is first moved beside ``path`` (the rename is the
                # take), then linked there, which fails if a workspace is there.
                target = path if label == LABEL_LAYER else path.parent / f".{path.name}.{secrets.token_hex(4)}.spare"
                try:
                    os.rename(self.directory / name, target)
                except FileNotFoundError:
                    continue  # another taker's (or no directory at ``path``: the caller's make says so)
                except OSError as exc:  # another filesystem, say: the caller makes its disk
                    log.warning("could not take the spare disk %s: %s", self.directory / name, exc)
                    return False
                if label == LABEL_WORKSPACE:
                    try:
                        os.link(target, path)
                    except FileExistsError as exc:
                        raise DiskError(
                            f"workspace {path} already exists: a workspace is never made over another"
                        ) from exc
                    except OSError as exc:
                        raise DiskError(f"workspace {path}: {exc}") from exc
                    finally:
                        _remove(target)
                if sync:
                    sync_dir(path.parent)
                return True
            return False
        finally:
            self._wake.set()  # after the take: a fill that looks now sees the disk gone

    def fill(self) -> int:
        """Make spares until ``count`` of each are at hand, and remove those of other sizes and
        what a fill that died left half-made; returns how many were made."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        made = 0
        with _locked(self.directory / ".lock", f"spare disks in {self.directory}"):
            have = dict.fromkeys(SPARE_SIZES, 0)
            for name in os.listdir(self.directory):
                label = _spare_label(name)
                if label is not None:
                    have[label] += 1
                elif name != ".lock":
                    _remove(self.directory / name)
            for label, size in SPARE_SIZES.items():
                for _ in range(self.count - have[label]):
                    if self._closed.is_set():
                        return made
                    disk = self.directory / f"{_spare_prefix(label, size)}{secrets.token_hex(8)}.ext4"
                    with _scratch(disk) as tmp:
                        _mkfs(tmp, size, label, f"spare {disk}")
                        if label == LABEL_WORKSPACE:
                            _open_root_dir(tmp, f"spare {disk}")
                        os.rename(tmp, disk)
                    made += 1
        sync_dir(self.directory)
        return made

    def start(self) -> None:
        """Fill now, and again after each take, on a daemon thread, until ``close``."""
        if self.count == 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._filler, name="sandboxctl-vm-spares", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()

    def _filler(self) -> None:
        first = True
        while not self._closed.is_set():
            if not first:
                self._wake.wait()
                self._wake.clear()
                if self._closed.wait(FILL_DELAY):
                    return
            first = False
            try:
                self.fill()
            except (DiskError, OSError) as exc:
                log.warning("could not make spare VM disks (a create makes its own): %s", exc)


def _spare_prefix(label: str, size: int) -> str:
    return f"{label}-v{SPARE_FORMAT}-{size}-"


def _spare_label(name: str) -> str | None:
    """The label of the spare disk named ``name`` if it is one of today's (format and size),
    else None."""
    for label, size in SPARE_SIZES.items():
        if name.startswith(_spare_prefix(label, size)) and name.endswith(".ext4"):
            return label
    return None


def make_layer(path: Path, size: int = LAYER_SIZE) -> None:
    """Make a fresh, empty sparse ext4 disk of ``size`` bytes at ``path``, labelled ``LABEL_LAYER``.

    A layer is a VM's writable scratch over its root disk, so one already at ``path`` is replaced
    (atomically: a reader sees the old layer or the new one, never a half-made one).
    """
    with _scratch(path) as tmp:
        _mkfs(tmp, size, LABEL_LAYER, f"layer {path}")
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise DiskError(f"layer {path}: {exc}") from exc
    sync_dir(path.parent)


def check(path: Path) -> str:
    """Check, and mend what it safely can, the ext4 disk at ``path`` with ``e2fsck -p`` (preen).

    The disk must be one no VM is using. Returns "" when it was clean, or a one-line summary of
    what e2fsck mended (for the caller to log). Raises DiskError with e2fsck's own message when
    it found what preen may not mend, or could not check the file at all (missing, not an ext4
    filesystem). Never deletes nor remakes the disk: what is on it is the sandbox's.

    A disk whose superblock says it was cleanly unmounted, with no error recorded, no journal to
    replay and no check due, is taken as clean without running e2fsck: that is the test e2fsck -p
    itself makes before it skips a disk, read here in microseconds instead of a process's
    milliseconds on every start. Anything else (a superblock that is not ext4's) goes to e2fsck.
    """
    if _cleanly_unmounted(path):
        return ""
    result = _run([E2FSCK, "-p", str(path)], FSCK_TIMEOUT, f"disk {path}")
    if result.returncode == 0:
        return ""
    if result.returncode in (1, 2):
        return _mended(path, result.stdout + result.stderr)
    raise DiskError(f"disk {path}: e2fsck -p failed (exit {result.returncode}): {_message(result)}")


# The ext4 superblock (1024 bytes at offset 1024): the fields e2fsck -p reads to decide a disk is clean.
_SUPERBLOCK = struct.Struct(
    "<52xHhHH4xII24xI"
)  # mnt_count, max_mnt_count, magic, state, lastcheck, checkinterval, incompat
_EXT4_MAGIC = 0xEF53
_VALID_FS, _ERROR_FS = 0x1, 0x2
_INCOMPAT_RECOVER = 0x4  # the journal has transactions to replay
_ERROR_COUNT = struct.Struct("<I")  # s_error_count, at byte 0x194 of the superblock
_ERROR_COUNT_AT = 0x194


def _cleanly_unmounted(path: Path) -> bool:
    """Whether the ext4 superblock of the disk at ``path`` says e2fsck -p would find nothing to do."""
    try:
        with open(path, "rb") as disk:
            disk.seek(1024)
            block = disk.read(1024)
    except OSError:
        return False  # e2fsck says why, in its own words
    if len(block) < 1024:
        return False
    mounts, max_mounts, magic, state, lastcheck, interval, incompat = _SUPERBLOCK.unpack_from(block)
    (errors,) = _ERROR_COUNT.unpack_from(block, _ERROR_COUNT_AT)
    return (
        magic == _EXT4_MAGIC
        and state & (_VALID_FS | _ERROR_FS) == _VALID_FS
        and not incompat & _INCOMPAT_RECOVER
        and errors == 0
        and not (max_mounts > 0 and mounts >= max_mounts)
        and not (interval > 0 and time.time() >= lastcheck + interval)
    )


def disk_usage(path: Path) -> int:
    """The bytes the disk at ``path`` actually takes on the host (its allocated blocks), which for a
    sparse disk is what has been written, not its size. DiskError if it cannot be read."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError as exc:
        raise DiskError(f"disk {path}: {exc}") from exc


# -- the root disk ---------------------------------------------------------------------------------


def _build_root(image: str, ident: str, disk: Path, engine: Sequence[str]) -> None:
    """Export, unpack and mkfs the image into ``disk``; the caller holds the image's lock."""
    what = f"image {image}"
    cache_dir = disk.parent
    tree = Path(tempfile.mkdtemp(prefix=f".{ident}.tree-", dir=cache_dir))
    image_tmp = cache_dir / f".{ident}.ext4-{secrets.token_hex(4)}"
    try:
        os.chmod(tree, 0o755)
        _export(image, ident, tree, engine)
        size, entries = _tree_size(tree)
        _mkfs(image_tmp, size, LABEL_ROOT, what, tree=tree, inodes=entries + entries // 4 + 1024)
        os.chmod(image_tmp, 0o444)
        _fsync(image_tmp)
        os.rename(image_tmp, disk)
        sync_dir(cache_dir)
    except OSError as exc:
        raise DiskError(f"{what}: {exc}") from exc
    finally:
        _remove(tree)
        _remove(image_tmp)


def _export(image: str, ident: str, tree: Path, engine: Sequence[str]) -> None:
    """Unpack the image's filesystem into ``tree`` through a throwaway container, always removed."""
    what = f"image {image}"
    name = f"sandboxctl-vmdisk-{ident[:12]}-{secrets.token_hex(4)}"
    create = [*engine, "create", "--name", name, "--label", f"{BUILD_LABEL}={ident}", "--pull", "never"]
    create += ["--network", "none", "--entrypoint", "true", ident, "true"]
    try:
        result = _run(create, ENGINE_TIMEOUT, what)
        if result.returncode != 0:
            raise DiskError(f"{what}: {_tool_name(engine)} create failed: {_message(result)}")
        _stream_export(what, [*engine, "export", name], tree)
    finally:
        removed = _run([*engine, "rm", "-f", "--", name], ENGINE_TIMEOUT, what, check_timeout=False)
        if removed.returncode != 0:
            log.warning("%s: throwaway container %s may be left: %s", what, name, _message(removed))


def _stream_export(what: str, argv: list[str], tree: Path) -> None:
    """Run ``podman export`` and unpack its tar stream into ``tree``, all within EXPORT_TIMEOUT."""
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        except FileNotFoundError as exc:
            raise DiskError(f"{what}: {argv[0]} is not installed: run scripts/setup-engines.sh") from exc
        assert proc.stdout is not None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        watchdog = threading.Timer(EXPORT_TIMEOUT, expire)
        watchdog.daemon = True
        watchdog.start()
        failure: Exception | None = None
        try:
            _extract(proc.stdout, tree)
            while proc.stdout.read(1 << 16):  # the archive's padding, so the exporter can finish
                pass
        except (OSError, tarfile.TarError, DiskError) as exc:
            failure = exc
        finally:
            killed = failure is not None and proc.poll() is None
            if killed:
                proc.kill()
            proc.stdout.close()
            try:
                code = proc.wait(timeout=ENGINE_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            watchdog.cancel()
        errors.seek(0)
        message = _trim(errors.read().decode(errors="replace"))
    if expired.is_set():
        raise DiskError(f"{what}: {argv[0]} export timed out after {EXPORT_TIMEOUT:g} s")
    if isinstance(failure, DiskError):  # an unsafe member: the exporter was stopped for it
        raise DiskError(f"{what}: {failure}") from failure
    if code != 0 and not killed:  # the exporter's own failure explains a torn stream best
        raise DiskError(f"{what}: {argv[0]} export failed: {message or f'exit {code}'}")
    if failure is not None:
        raise DiskError(f"{what}: unpacking its filesystem failed: {failure}") from failure


def _extract(stream: IO[bytes], tree: Path) -> None:
    """Unpack the tar ``stream`` into the directory ``tree``, member by member through _safe_member;
    raises DiskError on a member that would escape ``tree``, tarfile's or the OS's errors otherwise."""
    with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as archive:
        archive.extractall(str(tree), numeric_owner=True, filter=_safe_member)


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """The member as it may be unpacked into ``dest``, None to skip it, or DiskError if it may not.

    The checks are on the tree as unpacked so far (nothing else writes in it): the member's path
    has no ``..``, and no directory on the way to it is a symlink, so it lands inside ``dest``;
    what is already at its path is removed first (a symlink there would otherwise be written
    through), unless it is a directory, which only a directory may meet. A hard link must name a
    regular file already unpacked. Device nodes are skipped.
    """
    if member.ischr() or member.isblk():
        return None
    name = _relative(member.name, member.name)
    if not name:
        if not member.isdir():
            raise DiskError(f"unsafe member {member.name!r}: the root of the tree is not a directory")
        return member.replace(name=".", deep=False)
    _check_parents(dest, name, member.name)
    target = os.path.join(dest, name)
    try:
        existing = os.lstat(target)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(existing.st_mode):
            if not member.isdir():
                raise DiskError(f"unsafe member {member.name!r}: it would replace a directory")
        else:
            os.unlink(target)
    if member.islnk():
        link = _relative(member.linkname, member.name)
        _check_parents(dest, link, member.name)
        try:
            linked = os.lstat(os.path.join(dest, link))
        except FileNotFoundError:
            linked = None
        if linked is None or not stat.S_ISREG(linked.st_mode):
            raise DiskError(f"unsafe member {member.name!r}: a hard link to {member.linkname!r}, no regular file")
        return member.replace(name=name, linkname=link, deep=False)
    return member.replace(name=name, deep=False)


def _relative(name: str, member: str) -> str:
    """``name``, a path in the archive, relative to its root ("" for the root itself); DiskError if
    it has a ``..`` or a NUL."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts or "\0" in name:
        raise DiskError(f"unsafe member {member!r}: the path {name!r} leaves the tree")
    return "/".join(parts)


def _check_parents(dest: str, name: str, member: str) -> None:
    """DiskError unless every directory on the way to ``name`` under ``dest`` that exists is a real
    directory (not a symlink, which could lead out of the tree)."""
    path = dest
    for part in name.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return  # tarfile makes the rest as plain directories
        if not stat.S_ISDIR(mode):
            raise DiskError(f"unsafe member {member!r}: {path[len(dest) :]!r} on its way is not a directory")


def _tree_size(tree: Path) -> tuple[int, int]:
    """The disk size for the tree: its content * 1.25 + 32 MiB, whole MiB, at least ROOT_MIN_SIZE;
    and its number of entries. Content counts each file in whole 4 KiB blocks, plus an inode."""
    total = 0
    entries = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            total += 256 + (-(-st.st_size // 4096) * 4096 if not stat.S_ISLNK(st.st_mode) or st.st_size >= 60 else 0)
    size = -(-(total + total // 4 + 32 * MIB) // MIB) * MIB
    return max(size, ROOT_MIN_SIZE), entries


def _remove_leftovers(directory: Path, name: str) -> None:
    """Remove what an interrupted make of ``name`` left in ``directory`` (``.<name>.*``); the caller
    knows none is running (it holds the image's lock, or works the sandbox's directory alone)."""
    for leftover in directory.glob(f".{name}.*"):
        _remove(leftover)


# -- making and checking filesystems ---------------------------------------------------------------


def _mkfs(path: Path, size: int, label: str, what: str, tree: Path | None = None, inodes: int | None = None) -> None:
    """Make an ext4 filesystem of ``size`` bytes (sparse) in the new file ``path``, labelled ``label``,
    its root directory owned by root, filled from ``tree`` if given."""
    if size < MIB or size % 1024:
        raise DiskError(f"{what}: a disk's size must be whole KiB, at least 1 MiB (not {size})")
    with open(path, "xb") as file:
        file.truncate(size)
    # The file is new and sparse, so its unwritten journal already reads as zeros: mkfs need not
    # write it (32 MiB of a 1 GiB disk's, which the host would then write back for nothing).
    argv = [MKFS, "-q", "-F", "-L", label, "-E", "root_owner=0:0,lazy_journal_init=1"]
    if tree is not None:
        argv += ["-d", str(tree)]
    if inodes is not None:
        argv += ["-N", str(inodes)]
    result = _run([*argv, str(path), f"{size // 1024}k"], MKFS_TIMEOUT, what)
    if result.returncode != 0:
        raise DiskError(f"{what}: {MKFS} failed: {_message(result)}")


def _open_root_dir(path: Path, what: str) -> None:
    """Give the filesystem in ``path`` a root directory mode 0777 (mkfs.ext4 makes it 0755), so a
    guest user that is not root can write in it; checked after, as debugfs exits 0 on failure."""
    _run([DEBUGFS, "-w", "-R", "set_inode_field / mode 040777", str(path)], DEBUGFS_TIMEOUT, what)
    result = _run([DEBUGFS, "-R", "stat /", str(path)], DEBUGFS_TIMEOUT, what)
    if not re.search(r"Mode:\s+0?777\b", result.stdout):
        raise DiskError(f"{what}: could not open its root directory to all users: {_message(result)}")


def _mended(path: Path, output: str) -> str:
    """One line of what ``e2fsck -p`` said it mended: its messages without the disk's name, the
    "check forced" notice, nor its closing statistics (unless nothing else was said)."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("e2fsck ")]
    lines = [re.sub(r"^[^:\s]*:\s+", "", line, count=1) if ":" in line else line for line in lines]
    fixes = [
        line
        for line in lines
        if "check forced" not in line and not re.match(r"\d+/\d+ files \(", line) and "clean," not in line
    ]
    summary = "; ".join(re.sub(r"\s+", " ", line) for line in (fixes or lines[-1:]))
    return f"e2fsck mended {path.name}: {summary or 'errors corrected'}"[:500]


# -- small helpers ---------------------------------------------------------------------------------


def _run(
    argv: Sequence[str], timeout: float, what: str, check_timeout: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tool with a timeout; DiskError if it is not installed or (with check_timeout) too slow."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout)
    except FileNotFoundError as exc:
        engine = os.path.basename(argv[0]) in _ENGINES
        installer = "scripts/setup-engines.sh" if engine else "scripts/setup-vm.sh"
        raise DiskError(f"{what}: {argv[0]} is not installed: run {installer}") from exc
    except subprocess.TimeoutExpired as exc:
        if not check_timeout:
            return subprocess.CompletedProcess(list(argv), -1, "", f"timed out after {timeout:g} s")
        raise DiskError(f"{what}: {' '.join(argv[:2])} timed out after {timeout:g} s") from exc


def _message(result: subprocess.CompletedProcess[str]) -> str:
    """The tool's own message: its stderr, then its stdout, without version banners, a few lines."""
    text = "\n".join(part for part in (result.stderr, result.stdout) if part)
    return _trim(text) or f"exit {result.returncode}"


def _trim(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    lines = [line[:300] for line in lines if line.strip() and not re.match(r"^(e2fsck|debugfs|mke2fs) \d", line)]
    if len(lines) > _MESSAGE_LINES:
        lines = [*lines[:_MESSAGE_LINES], "..."]
    return "\n".join(lines)


def _tool_name(engine: Sequence[str]) -> str:
    return os.path.basename(engine[0]) if engine else "engine"


@contextlib.contextmanager
def _locked(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (each holder opens it anew, so threads of one
    process exclude each other too); DiskError after LOCK_TIMEOUT seconds of waiting."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DiskError(f"{what}: cannot open the lock {lock_path}: {exc}") from exc
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DiskError(f"{what}: another build held {lock_path} for over {LOCK_TIMEOUT:g} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for a disk being made; whatever is left there is removed."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
    except OSError as exc:
        raise DiskError(f"disk {path}: {exc}") from exc
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    """Remove a file or a whole tree, even one with read-only directories; never raises."""
    try:
        if not (path.is_dir() and not path.is_symlink()):
            path.unlink(missing_ok=True)
            return
        try:
            shutil.rmtree(path)
        except OSError:  # a directory of the image's without write permission, when not root
            os.chmod(path, 0o700)
            for dirpath, dirnames, _ in os.walk(path):
                for name in dirnames:
                    with contextlib.suppress(OSError):
                        if not os.path.islink(os.path.join(dirpath, name)):
                            os.chmod(os.path.join(dirpath, name), 0o700)
            shutil.rmtree(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """Make the renames and links in ``path`` durable; best effort (the disks themselves are
    already synced)."""
    with contextlib.suppress(OSError):
        _fsync(path)
