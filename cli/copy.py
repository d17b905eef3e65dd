"""``sandboxctl cp``: files and directories into and out of a sandbox, as ``docker cp`` copies
them, through the engine's archive API.

The copy streams: a tar archive is written by one thread into a pipe and sent to the engine in
chunks as it is made, and an archive from the engine is unpacked as it arrives, so no file is
ever held whole in memory. It works on a sandbox that does not run (Stopped, Completed, Error):
its container and workspace volume are there. What comes out of a sandbox is untrusted: it is
unpacked with tarfile's ``data`` filter, so no member may land outside the destination, be a
device, or link outside it. Paths in the sandbox are absolute, or relative to /workspace, and
never hold ``..``. Each copy is recorded in the log (``sandboxctl.sandbox.copied.v1``)."""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sandboxctl.cli.attach import engine_driver as attach_driver
from sandboxctl.cli.attach import in_thread
from sandboxctl.client import FailedPrecondition, NotFound, SandboxClient, Unavailable
from sandboxctl.drivers.base import WORKSPACE, DriverError, EngineTimeout
from sandboxctl.events.limits import PATH_MAX
from sandboxctl.runtime.config import Config
from sandboxctl.statemachine import Phase
from sandboxctl.statemachine.names import validate_name

CHUNK = 256 * 1024
# The kernel's own views: never a place to copy to or from.
PSEUDO = ("/proc", "/sys", "/dev")
_REMOTE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]{0,62}):(.*)$", re.S)


class CopyError(ValueError):
    """A copy that cannot be made as asked: the line the user reads."""


def split_remote(arg: str) -> tuple[str, str] | None:
    """``NAME:PATH`` as (name, path); None for a local path (one that starts with ``/`` or ``.``, or
    has no ``NAME:`` before it: ``./a:b`` is local, as with docker)."""
    if arg.startswith(("/", ".")):
        return None
    found = _REMOTE.match(arg)
    return (found.group(1), found.group(2)) if found else None


def sandbox_path(path: str) -> str:
    """A path in a sandbox, made absolute (relative to /workspace) and checked: no ``..``, none of
    the kernel's pseudo filesystems, no NUL, at most PATH_MAX."""
    if not path:
        raise CopyError("a path in the sandbox is needed after NAME:")
    if "\x00" in path or len(path) > PATH_MAX:
        raise CopyError(f"path {path[:80]!r}: not a path (NUL, or longer than {PATH_MAX})")
    if ".." in path.split("/"):
        raise CopyError(f"path {path[:200]!r}: '..' is not allowed; name the path in the sandbox as it is")
    trailing = path.endswith("/")
    full = posixpath.normpath(posixpath.join(WORKSPACE, path))  # a relative path starts at the working directory
    if any(full == root or full.startswith(root + "/") for root in PSEUDO):
        raise CopyError(f"path {full[:200]}: {full.split('/')[1]} is the kernel's, not the sandbox's files")
    return full + ("/" if trailing and full != "/" else "")


def is_dir(stat_: dict[str, Any] | None) -> bool:
    """Whether the engine's stat (Go's os.FileMode bits) says directory."""
    return stat_ is not None and bool(int(stat_.get("mode", 0)) & (1 << 31))


def tar_chunks(source: Path, arcname: str) -> tuple[Iterator[bytes], list[BaseException], list[int]]:
    """A tar archive of ``source`` named ``arcname``, made by a thread into a pipe and read here in
    chunks; an error of the thread is put in the returned list, the archive's size in the other."""
    read_fd, write_fd = os.pipe()
    errors: list[BaseException] = []
    size = [0]

    def write() -> None:
        try:
            with (
                os.fdopen(write_fd, "wb") as pipe,
                tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                tar.add(str(source), arcname=arcname)
        except BaseException as exc:  # reported by the reader once the pipe ends
            errors.append(exc)

    thread = threading.Thread(target=write, name="sandboxctl-cp-tar", daemon=True)
    thread.start()

    def chunks() -> Iterator[bytes]:
        with os.fdopen(read_fd, "rb") as pipe:
            while chunk := pipe.read(CHUNK):
                size[0] += len(chunk)
                yield chunk
        thread.join()
        if errors:
            raise errors[0]

    return chunks(), errors, size


class _ChunkReader:
    """A file-like reader over an iterator of chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buffer) < n:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            self.size += len(chunk)
            self._buffer += chunk
        if n < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data


def unpack(chunks: Iterator[bytes], top: str, directory: Path, rename: str | None) -> int:
    """Unpack the engine's archive of ``top`` into ``directory`` as it streams in, ``top`` renamed
    to ``rename`` when given; returns the archive's size. Members are checked by the ``data``
    filter: nothing lands outside ``directory``."""
    reader = _ChunkReader(chunks)
    stream: IO[bytes] = reader  # type: ignore[assignment]
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if rename is not None:
                    head, sep, rest = member.name.partition("/")
                    if head == top:
                        member.name = rename + sep + rest
                tar.extract(member, path=directory, filter="data")
    except tarfile.FilterError as exc:
        raise CopyError(f"refused a file the sandbox sent: {exc}") from None
    except tarfile.TarError as exc:
        raise CopyError(f"the engine's archive is not readable: {exc}") from None
    return reader.size


def check_local_source(local: Path) -> tuple[str, bool]:
    """The name ``local`` is copied under, and whether it is a directory; CopyError if it is not
    there or is neither a file, a directory nor a link."""
    try:
        mode = local.lstat().st_mode
    except OSError as exc:
        raise CopyError(f"{local}: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise CopyError(f"{local}: only files, directories and links are copied")
    return local.name or local.resolve().name, stat.S_ISDIR(mode)


def valid_name(name: str) -> None:
    problem = validate_name(name)
    if problem:
        raise CopyError(problem)


# Phases with no container to copy to or from (yet, or any more), and those of a frozen one.
_NO_CONTAINER = (Phase.PROVISIONING, Phase.DELETING, Phase.DELETED)
_FROZEN = (Phase.PAUSING, Phase.PAUSED, Phase.RESUMING)


async def run_copy(client: SandboxClient, config: Config, source: str, destination: str, answer_timeout: float) -> str:
    """Copy between a sandbox and here, record it in the log, and return the line to print."""
    src, dst = split_remote(source), split_remote(destination)
    if (src is None) == (dst is None):
        raise CopyError(
            "cp copies between a sandbox and here: one of SOURCE and DEST is NAME:PATH, the other a local path"
        )
    name, remote = src or dst  # type: ignore[misc]
    valid_name(name)
    path = sandbox_path(remote)
    local = Path(destination if src else source)
    base, local_dir = check_local_source(local) if dst is not None else ("", False)
    item = await client.get(name)
    phase = Phase(item["phase"])
    if phase in _NO_CONTAINER or phase in _FROZEN:
        why = "resume it first" if phase in _FROZEN else "it has no container to copy with"
        raise FailedPrecondition(f"sandbox {name} is {phase}: {why}")
    driver = attach_driver(config, item["driver"], answer_timeout)
    sid = item["sandbox_id"]
    try:
        if dst is not None:
            directory, arcname = await _target_in(driver, name, sid, path, base, local_dir)
            chunks, _, size = tar_chunks(local, arcname)
            await in_thread(driver.copy_in, name, sid, directory, chunks)
            copied, where = size[0], posixpath.join(directory, arcname)
            await client.record_copy(name, "in", where, copied)
            return f"copied {local} to {name}:{where} ({copied} bytes)"
        where = path.rstrip("/")
        if not where:
            raise CopyError("name a file or directory in the sandbox, not /")
        found = await in_thread(driver.path_stat, name, sid, where)
        if found is None:
            raise NotFound(f"no {where} in sandbox {name}")
        into, rename = _target_out(local, is_dir(found))
        top = posixpath.basename(where)
        copied = await in_thread(lambda: unpack(driver.copy_out(name, sid, where), top, into, rename))
        await client.record_copy(name, "out", where, copied)
        return f"copied {name}:{where} to {into / (rename or top)} ({copied} bytes)"
    except DriverError as exc:
        if isinstance(exc, EngineTimeout):
            raise Unavailable(f"{item['driver']} did not answer for sandbox {name}: {exc.message}") from exc
        raise FailedPrecondition(f"{item['driver']} could not copy for sandbox {name}: {exc.message}") from exc
    finally:
        driver.close()


async def _target_in(driver: Any, name: str, sid: str, path: str, base: str, local_dir: bool) -> tuple[str, str]:
    """Where in the sandbox a local ``base`` goes, as docker cp puts it: into ``path`` if that is a
    directory (keeping its name), else to ``path`` itself, in a directory that must be there."""
    target = await in_thread(driver.path_stat, name, sid, path.rstrip("/") or "/")
    if is_dir(target):
        return path.rstrip("/") or "/", base
    if path.endswith("/"):
        raise CopyError(f"{name}:{path}: no such directory in the sandbox")
    if target is not None and local_dir:
        raise CopyError(f"{name}:{path} is a file: a directory cannot be copied onto it")
    parent = posixpath.dirname(path) or "/"
    if not is_dir(await in_thread(driver.path_stat, name, sid, parent)):
        raise CopyError(f"{name}:{parent}: no such directory in the sandbox")
    return parent, posixpath.basename(path)


def _target_out(local: Path, source_is_dir: bool) -> tuple[Path, str | None]:
    """Where here the sandbox's path goes: into ``local`` if it is a directory, else to ``local``
    itself, in a directory that must be there."""
    if local.is_dir():
        return local, None
    if not local.parent.is_dir():
        raise CopyError(f"{local.parent}: no such directory here")
    if local.exists() and source_is_dir:
        raise CopyError(f"{local} is a file: a directory cannot be copied onto it")
    return local.parent, local.name
