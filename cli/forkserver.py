"""The fork server: the command line imported once, and forked for each call (cli/fast.py).

``up`` and ``serve`` run it (``ForkServer``, supervised like their other children) on the Unix
socket ``cli.sock`` in the run directory. It is a process of its own, single-threaded and with no
event loop, so that forking it is safe: the copy starts from a clean interpreter with the command
line's modules in memory, and runs one call as a process of its own would.

What it trusts and what it does not:

- only its own user: the socket is private (0600, in the private run directory), and each
  connection's user is checked (SO_PEERCRED) before anything is read; another user's is closed;
- each request is bounded (``REQUEST_MAX``, read within ``REQUEST_WAIT``), its fields checked,
  and exactly three descriptors taken; anything else is refused and the caller runs the call
  itself, with nothing of it run here;
- at most ``CALLS_MAX`` calls at once; beyond them the caller runs its own;
- a copy of the code that changed since it started (an upgrade, an edit) is never run: the call
  is refused, and the server starts again from the new code.

The call's copy takes the caller's descriptors, working directory, umask and environment (its
time zone too), so its settings and files are the caller's, as if the caller had run it. A signal
the caller passes on is raised in the copy; a caller that goes away hangs it up (SIGHUP).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any, NoReturn

from sandboxctl.cli.fast import (
    EXIT,
    FALLBACK,
    REQUEST_MAX,
    RUN,
    SIGNAL_BYTES,
    SOCKET_NAME,
    package_dir,
    peer_uid,
)
from sandboxctl.runtime.supervise import die_with_parent, end_child

log = logging.getLogger(__name__)

CALLS_MAX = 64  # calls running at once
REQUEST_WAIT = 5.0  # seconds a caller has to send its request once connected
_SIGNALS = {byte: signum for signum, byte in SIGNAL_BYTES.items()}
_FIELDS = {"argv": list, "argv0": str, "env": dict, "cwd": str, "umask": int, "python": str, "package": str}


class Refused(Exception):
    """A call this server does not run (why): its caller runs it."""


def _newest_source(root: str) -> int:
    """The latest modification time (ns) of the package's Python files."""
    newest = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir() and entry.name != "__pycache__":
                    stack.append(entry.path)
                elif entry.name.endswith(".py"):
                    newest = max(newest, entry.stat().st_mtime_ns)
    return newest


def _text(value: Any) -> bool:
    return isinstance(value, str) and "\0" not in value


def _checked(data: bytes) -> dict[str, Any]:
    """The request, every field of the type it must be, or Refused."""
    try:
        req = json.loads(data)
    except ValueError:
        raise Refused("the request is not JSON") from None
    if not isinstance(req, dict) or any(not isinstance(req.get(k), t) for k, t in _FIELDS.items()):
        raise Refused("the request lacks a field or has one of the wrong type")
    if not all(_text(a) for a in req["argv"]) or not _text(req["argv0"]):
        raise Refused("an argument is not text")
    env = req["env"]
    if not all(_text(k) and k and "=" not in k and _text(v) for k, v in env.items()):
        raise Refused("an environment variable is not NAME=VALUE text")
    if not _text(req["cwd"]) or not os.path.isabs(req["cwd"]) or not 0 <= req["umask"] <= 0o777:
        raise Refused("the working directory or umask is not one")
    if req["python"] != sys.executable or req["package"] != package_dir():
        raise Refused("the fork server runs another interpreter or another copy of sandboxctl")
    return req


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The caller's request and its three descriptors, read within REQUEST_WAIT."""
    conn.settimeout(REQUEST_WAIT)
    fds: list[int] = []
    data = b""
    space = socket.CMSG_SPACE(3 * array("i").itemsize)
    try:
        while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            if len(data) >= 4 and struct.unpack("!I", data[:4])[0] > REQUEST_MAX:
                raise Refused(f"the request is over {REQUEST_MAX} bytes")
            chunk, ancillary, _flags, _addr = conn.recvmsg(65536, space if not data else 0)
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array("i")
                    got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
                    fds.extend(got)
            if not chunk:
                raise Refused("the caller went before its request was whole")
            data += chunk
        if len(fds) != 3:
            raise Refused(f"the request came with {len(fds)} descriptors, not 3")
        return _checked(data[4:]), fds
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    finally:
        conn.settimeout(None)


def _streams() -> None:
    """Standard input, output and error on descriptors 0, 1 and 2, as Python makes them for a
    process of its own: output line-buffered on a terminal, error always."""
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", line_buffering=os.isatty(1)
    )
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )


def _watch(conn: socket.socket, done: threading.Event) -> None:
    """Raise in this process each signal the caller passes on; hang up when the caller goes."""
    while True:
        try:
            byte = conn.recv(1)
        except OSError:
            byte = b""
        if done.is_set():
            return
        if not byte:
            os.kill(os.getpid(), signal.SIGHUP)
            return
        if byte in _SIGNALS:
            os.kill(os.getpid(), _SIGNALS[byte])


def _call(conn: socket.socket) -> NoReturn:
    """In the forked copy: take the caller's request and place, run the command line, answer its
    exit code, end."""
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        req, fds = _receive(conn)
        try:
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
        finally:
            for fd in fds:
                if fd > 2:
                    os.close(fd)
        os.chdir(req["cwd"])
    except (Refused, OSError, ValueError) as exc:  # nothing of the call has run: the caller runs it
        with contextlib.suppress(OSError):
            conn.sendall(FALLBACK + b" " + str(exc).encode(errors="replace")[:200] + b"\n")
        os._exit(0)
    os.umask(req["umask"])
    os.environ.clear()
    os.environ.update(req["env"])
    time.tzset()
    _streams()
    sys.argv = [req["argv0"], *req["argv"]]
    logging.getLogger().handlers.clear()
    done = threading.Event()
    code = 1
    try:
        conn.sendall(RUN + b"\n")
        threading.Thread(target=_watch, args=(conn, done), daemon=True).start()
        from sandboxctl.cli.main import main

        try:
            main(req["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        # The exit code goes to the caller from the server, which reaps this process: whichever
        # way it ends (os._exit after a stuck thread, a signal), the caller gets its status.
        done.set()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
        os._exit(code)


def _preload() -> None:
    """What most calls import, imported once, before any fork."""
    import sandboxctl.cli.main
    import sandboxctl.cli.output
    import sandboxctl.cli.progress
    import sandboxctl.cli.status  # noqa: F401


def _bind(path: Path) -> tuple[socket.socket, int]:
    """The listening socket on ``path`` (mode 0600), put in place at once over any left there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    listener.bind(str(staging))
    os.chmod(staging, 0o600)
    listener.listen(CALLS_MAX)
    os.rename(staging, path)
    return listener, os.stat(path).st_ino


def _status(status: int) -> int:
    """A process's wait status as a shell gives it: its exit code, or 128 + the signal that ended it."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def serve(path: Path) -> None:
    """Serve calls on ``path`` until SIGTERM (or this process's parent ends: die_with_parent)."""
    _preload()
    root = package_dir()
    started = _newest_source(root)
    listener, inode = _bind(path)
    calls: dict[int, socket.socket] = {}  # each running call's process and its caller
    stale = False
    woken, wake = os.pipe()  # a child's end wakes the loop (SIGCHLD)
    os.set_blocking(wake, False)
    os.set_blocking(woken, False)
    signal.set_wakeup_fd(wake)

    def stop(_signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for up, which stops us
    try:
        while not stale or calls:  # once stale, the calls running end before the new code starts
            ready, _, _ = select.select([listener.fileno(), woken], [], [], 5.0)
            if woken in ready:
                with contextlib.suppress(OSError):
                    os.read(woken, 4096)
            while calls:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                caller = calls.pop(pid, None)
                if caller is not None:
                    with contextlib.suppress(OSError), caller:
                        caller.setblocking(False)
                        caller.send(EXIT + b" %d\n" % _status(status))
            if listener.fileno() not in ready:
                continue
            conn, _ = listener.accept()
            try:
                uid = peer_uid(conn)
                if uid != os.geteuid():
                    log.warning("refused a call from another user (uid %d)", uid)
                    conn.close()
                    continue
                if stale or _newest_source(root) > started:
                    stale = True
                    raise Refused("sandboxctl's code changed since the fork server started")
                if len(calls) >= CALLS_MAX:
                    raise Refused(f"the fork server runs {CALLS_MAX} calls already")
            except Refused as exc:
                with contextlib.suppress(OSError), conn:
                    conn.sendall(FALLBACK + b" " + str(exc).encode() + b"\n")
                continue
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                for fd in (woken, wake):
                    os.close(fd)
                listener.close()
                for caller in calls.values():
                    caller.close()
                _call(conn)
            calls[pid] = conn
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()
        listener.close()
    if stale:  # start again from the new code, in this process (its supervisor sees one pid)
        log.warning("sandboxctl's code changed; the fork server starts again from it")
        os.execv(sys.executable, [sys.executable, "-m", "sandboxctl.cli.forkserver", str(path)])


class ForkServer:
    """The fork server as a child of ``up`` or ``serve`` (runtime.supervise.Child): restarted
    if it exits, ended with them."""

    name = "cli fork server"

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / SOCKET_NAME
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_name("cli-forkserver.log"), "ab") as logfile:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandboxctl.cli.forkserver", str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.path))
            except OSError:
                return False
            return True

    def stop(self) -> None:
        if self.proc is not None:
            end_child(self.proc)
        self.proc = None

    async def check(self) -> str:
        return ""


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Path(sys.argv[1]))
