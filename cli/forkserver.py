"""The fork server: the command line imported once, and forked for each call (cli/fast.py).

``up`` and ``serve`` run it (``ForkServer``, supervised like their other children, but never
essential: without it, calls run in their own interpreters as before) on the Unix socket
``cli.sock`` in the run directory. It is a process of its own, single-threaded and with no event
loop, so that forking it is safe: the copy starts from a clean interpreter with the command
line's modules in memory, and runs one call as a process of its own would.

What it trusts and what it does not:

- only its own user: the socket is private (0600, in the private run directory), and each
  connection's user, groups, namespaces and confinement (SO_PEERCRED, then /proc) are checked
  before anything is read; another user's connection is closed, unanswered;
- each request is bounded (``REQUEST_MAX``, read within ``HANDSHAKE_WAIT``), its fields checked,
  and exactly four descriptors taken; anything else is refused, and the caller runs the call
  itself, with nothing of it run here;
- the verbs in ``LOCAL_VERBS`` are refused whoever asks, and so is a caller whose ``PYTHON*``
  settings are not the server's (its module path, its mode);
- at most ``CALLS_MAX`` calls at once; beyond them the caller runs its own;
- a copy of the code that changed since it started (an upgrade, an edit) is never run: calls are
  refused until those running end, and the server starts again from the new code.

The call's copy takes the caller's descriptors, working directory, umask, ignored signals and
environment (its time zone and locale too), so its settings and files are the caller's, as if the
caller had run it. It runs only once the caller says go. A signal the caller passes on is raised
in the copy; a caller that goes away hangs it up (SIGHUP, then SIGKILL if that is ignored). The
copy says its own exit code; the server says how a copy ended that could not (a signal, an exit
from a stuck thread).
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import io
import json
import locale
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
    GO,
    HANDSHAKE_WAIT,
    KILLED,
    LOCAL_VERBS,
    REQUEST_MAX,
    RUN,
    SIGNAL_BYTES,
    SOCKET_NAME,
    package_dir,
    peer_credentials,
)
from sandboxctl.runtime.supervise import die_with_parent, end_child, open_log

log = logging.getLogger(__name__)

CALLS_MAX = 64  # calls running at once
_SIGNALS = {byte: signum for signum, byte in SIGNAL_BYTES.items()}
_FIELDS = {
    "argv": list,
    "argv0": str,
    "env": dict,
    "umask": int,
    "ignored": list,
    "utf8_mode": int,
    "streams": list,
    "python": str,
    "package": str,
}
_DESCRIPTORS = 4  # standard input, output, error, and the working directory
_NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup")
_CONFINEMENT = ("Uid:", "Gid:", "Groups:", "NoNewPrivs:", "Seccomp:", "CapEff:", "CapBnd:")
# The signals a call's copy takes at their defaults (the server handles or ignores them).
_DEFAULTS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH, signal.SIGTSTP, signal.SIGCONT)
_HELD = {signal.SIGCHLD, signal.SIGTERM}  # held across a fork, so the copy never runs the server's handlers


class Refused(Exception):
    """A call this server does not run (why): its caller runs it."""


def _newest_source(root: str) -> int:
    """The latest modification time (ns) of the package's Python files (0 for one that vanished)."""
    newest = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_dir() and entry.name != "__pycache__":
                            stack.append(entry.path)
                        elif entry.name.endswith(".py"):
                            newest = max(newest, entry.stat().st_mtime_ns)
        except OSError:
            continue
    return newest


def _context(pid: int | str) -> tuple[str, ...]:
    """What makes a process's power over the system: its ids and groups, capabilities and
    confinement, and its namespaces."""
    with open(f"/proc/{pid}/status") as f:
        status = tuple(line.strip() for line in f if line.startswith(_CONFINEMENT))
    label = ""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/attr/current") as f:
        label = f.read(4096)  # AppArmor's or SELinux's label, where one runs
    root = os.readlink(f"/proc/{pid}/root")  # a chroot
    return (*status, label, root, *(os.readlink(f"/proc/{pid}/ns/{ns}") for ns in _NAMESPACES))


def _python_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


def _text(value: Any) -> bool:
    return isinstance(value, str) and "\0" not in value


def _checked(data: bytes) -> dict[str, Any]:
    """The request, every field of the type it must be, or Refused."""
    try:
        req = json.loads(data)
    except (ValueError, RecursionError):
        raise Refused("the request is not JSON") from None
    if not isinstance(req, dict) or any(not isinstance(req.get(k), t) for k, t in _FIELDS.items()):
        raise Refused("the request lacks a field or has one of the wrong type")
    if not all(_text(a) for a in req["argv"]) or not _text(req["argv0"]):
        raise Refused("an argument is not text")
    if req["argv"] and req["argv"][0] in LOCAL_VERBS:
        raise Refused(f"{req['argv'][0]} runs in the caller's process")
    env = req["env"]
    if not all(_text(k) and k and "=" not in k and _text(v) for k, v in env.items()):
        raise Refused("an environment variable is not NAME=VALUE text")
    if not isinstance(req["umask"], int) or not 0 <= req["umask"] <= 0o777:
        raise Refused("the umask is not one")
    valid = {int(s) for s in (*SIGNAL_BYTES, signal.SIGTSTP)}
    if not all(isinstance(s, int) and s in valid for s in req["ignored"]):
        raise Refused("an ignored signal is not one the caller passes on")
    streams = req["streams"]
    if len(streams) != 3 or not all(
        isinstance(f, list) and len(f) == 2 and all(v is None or (_text(v) and len(v) < 64) for v in f) for f in streams
    ):
        raise Refused("the standard streams' encodings are not given")
    if req["utf8_mode"] != sys.flags.utf8_mode:
        raise Refused("the caller's UTF-8 mode is not the fork server's")
    if req["python"] != sys.executable or req["package"] != package_dir():
        raise Refused("the fork server runs another interpreter or another copy of sandboxctl")
    if _python_settings(env) != _python_settings(dict(os.environ)):
        raise Refused("the caller's PYTHON* settings are not the fork server's")
    return req


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int], bytes]:
    """The caller's request, its descriptors, and what came after the request; within
    HANDSHAKE_WAIT in all."""
    deadline = time.monotonic() + HANDSHAKE_WAIT
    fds: list[int] = []
    data = b""
    space = socket.CMSG_SPACE(_DESCRIPTORS * array("i").itemsize)
    try:
        while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            if len(data) >= 4 and struct.unpack("!I", data[:4])[0] > REQUEST_MAX:
                raise Refused(f"the request is over {REQUEST_MAX} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Refused(f"the request did not come whole within {HANDSHAKE_WAIT:g}s")
            conn.settimeout(remaining)
            try:
                chunk, ancillary, _flags, _addr = conn.recvmsg(65536, space if not data else 0)
            except TimeoutError:
                continue
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array("i")
                    got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
                    fds.extend(got)
            if not chunk:
                raise Refused("the caller went before its request was whole")
            data += chunk
        if len(fds) != _DESCRIPTORS:
            raise Refused(f"the request came with {len(fds)} descriptors, not {_DESCRIPTORS}")
        size = struct.unpack("!I", data[:4])[0]
        return _checked(data[4 : 4 + size]), fds, data[4 + size :]
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def _streams(given: list[list[str | None]], env: dict[str, str]) -> None:
    """Standard input, output and error on descriptors 0, 1 and 2, as Python made the caller's:
    its encodings and error handlers; output line-buffered on a terminal, error always, both
    written through with PYTHONUNBUFFERED."""
    through = bool(env.get("PYTHONUNBUFFERED"))
    (in_enc, in_err), (out_enc, out_err), (err_enc, err_err) = (_known(e, r) for e, r in given)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), in_enc, in_err)
    sys.stdout = _writer(1, out_enc, out_err, os.isatty(1), through)
    sys.stderr = _writer(2, err_enc, err_err, True, through)


def _writer(fd: int, encoding: str | None, errors: str | None, line: bool, through: bool) -> io.TextIOWrapper:
    """A text stream on ``fd`` as CPython makes one: on the raw file, written through, when unbuffered."""
    raw = io.FileIO(fd, "w", closefd=False)
    if through:
        return io.TextIOWrapper(raw, encoding, errors, line_buffering=line, write_through=True)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding, errors, line_buffering=line)


def _known(encoding: str | None, errors: str | None) -> tuple[str | None, str | None]:
    """An encoding and error handler this interpreter knows (the caller's), or its defaults."""
    try:
        if encoding:
            codecs.lookup(encoding)
        if errors:
            codecs.lookup_error(errors)
    except (LookupError, UnicodeError, ValueError):
        return None, None
    return encoding, errors


def _watch(conn: socket.socket, early: bytes, done: threading.Event) -> None:
    """Raise in this process each signal the caller passes on; when the caller goes, hang up,
    and end for good a call that ignores the hangup (a nohup caller's) soon after."""
    pending = list(early)
    while True:
        if pending:
            byte = bytes([pending.pop(0)])
        else:
            try:
                byte = conn.recv(1)
            except OSError:
                byte = b""
        if done.is_set():
            return
        if not byte:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(HANDSHAKE_WAIT)
            if not done.is_set():
                os.kill(os.getpid(), signal.SIGKILL)
            return
        if byte in _SIGNALS:
            os.kill(os.getpid(), _SIGNALS[byte])


def _call(conn: socket.socket, mask: set[int | signal.Signals]) -> NoReturn:
    """In the forked copy: take the caller's request and place, run the command line once the
    caller says go, say its exit code, end."""
    for signum in _DEFAULTS:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        req, fds, early = _receive(conn)
        try:
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
            os.fchdir(fds[3])
        finally:
            for fd in fds:
                if fd > 2:
                    os.close(fd)
    except (Refused, OSError, ValueError) as exc:  # nothing of the call has run: the caller runs it
        with contextlib.suppress(OSError):
            conn.sendall(FALLBACK + b" " + str(exc).encode(errors="replace")[:200] + b"\n")
        os._exit(0)
    for signum in req["ignored"]:
        signal.signal(signum, signal.SIG_IGN)
    os.umask(req["umask"])
    os.environ.clear()
    os.environ.update(req["env"])
    time.tzset()
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_CTYPE, "")
    _streams(req["streams"], req["env"])
    sys.argv = [req["argv0"], *req["argv"]]
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    try:
        conn.settimeout(HANDSHAKE_WAIT)
        conn.sendall(RUN + b" %d\n" % os.getpid())
        go = conn.recv(1)
        conn.settimeout(None)
    except OSError:
        go = b""
    if go != GO:  # the caller gave up waiting, or is slow to say go: it runs the call itself
        with contextlib.suppress(OSError):  # said before this process ends, so before the server's line
            conn.sendall(FALLBACK + b" no go within %ds\n" % HANDSHAKE_WAIT)
        os._exit(0)
    done = threading.Event()
    code = 1
    try:
        threading.Thread(target=_watch, args=(conn, early, done), daemon=True).start()
        from sandboxctl.cli.main import main

        main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    finally:
        done.set()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.sendall(EXIT + b" %d\n" % code)
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
        os._exit(code)


def _preload() -> None:
    """What most calls import, imported once, before any fork."""
    import sandboxctl.cli.main
    import sandboxctl.cli.output
    import sandboxctl.cli.progress
    import sandboxctl.cli.status  # noqa: F401


def _bind(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """The listening socket on ``path`` (mode 0600), put in place at once over any left there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    listener.bind(str(staging))
    os.chmod(staging, 0o600)
    listener.listen(CALLS_MAX)
    os.rename(staging, path)
    st = os.stat(path)
    return listener, (st.st_dev, st.st_ino)


def _ended(status: int) -> bytes:
    """How a call's process ended, as its caller ends in turn: an exit code, or a signal."""
    if os.WIFSIGNALED(status):
        return KILLED + b" %d\n" % os.WTERMSIG(status)
    return EXIT + b" %d\n" % os.waitstatus_to_exitcode(status)


def _admit(conn: socket.socket, own: tuple[str, ...]) -> bool:
    """Whether the caller is this server's own user, with its groups, namespaces and confinement
    (a caller that is not, and a confined one, runs its calls itself)."""
    pid, uid, _gid = peer_credentials(conn)
    if uid != os.geteuid():
        log.warning("refused a call from another user (uid %d)", uid)
        return False
    try:
        return _context(pid) == own
    except OSError:  # gone already
        return False


ARGV = [sys.executable, "-P", "-m", "sandboxctl.cli.forkserver"]  # -P: no working directory on sys.path


def serve(path: Path) -> None:
    """Serve calls on ``path`` until SIGTERM (or this process's parent ends: die_with_parent)."""
    root = package_dir()
    started = _newest_source(root)
    _preload()
    own = _context("self")
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
    listener, place = _bind(path)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(woken, select.POLLIN)
    callers: dict[int, int] = {}  # each call's caller socket (fd), and the call's process
    try:
        while not stale or calls:  # once stale, the calls running end before the new code starts
            ready = dict(poller.poll(5000))
            if woken in ready:
                with contextlib.suppress(OSError):
                    os.read(woken, 4096)
            for fd, events in ready.items():
                # A caller gone (killed while its call was stopped by Ctrl-Z, too): the call goes on,
                # so that it sees the hangup and ends.
                if fd in callers and events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    poller.unregister(fd)
                    with contextlib.suppress(OSError):
                        os.kill(callers.pop(fd), signal.SIGCONT)
            while calls:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                caller = calls.pop(pid, None)
                if caller is not None:  # unread if the call said its own exit code already
                    if callers.pop(caller.fileno(), None) is not None:
                        poller.unregister(caller)
                    with contextlib.suppress(OSError), caller:
                        caller.setblocking(False)
                        caller.send(_ended(status))
            if listener.fileno() not in ready:
                continue
            conn, _ = listener.accept()
            try:
                if not _admit(conn, own):
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
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
            pid = os.fork()
            if pid == 0:
                try:
                    signal.set_wakeup_fd(-1)
                    for fd in (woken, wake):
                        os.close(fd)
                    listener.close()
                    for caller in calls.values():
                        caller.close()
                    _call(conn, held)
                finally:
                    os._exit(70)  # whatever happens in the copy, it never returns to this loop
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            calls[pid] = conn
            callers[conn.fileno()] = pid
            poller.register(conn, select.POLLRDHUP)
    finally:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == place:
                path.unlink()
        listener.close()
    if stale:  # start again from the new code, in this process (its supervisor sees one pid)
        log.warning("sandboxctl's code changed; the fork server starts again from it")
        os.execv(sys.executable, [*ARGV, str(path)])


class ForkServer:
    """The fork server as a child of ``up`` or ``serve`` (runtime.supervise.Child): restarted
    if it exits, ended with them; given up alone if it keeps failing (``essential``)."""

    name = "cli fork server"
    essential = False

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / SOCKET_NAME
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        logfile = open_log(self.path.with_name("cli-forkserver.log"))
        try:
            self.proc = subprocess.Popen(
                [*ARGV, str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                cwd="/",
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        finally:
            os.close(logfile)

    def answers(self) -> bool:
        return self.path.is_socket()

    def stop(self) -> None:
        if self.proc is not None:
            end_child(self.proc)
        self.proc = None

    async def check(self) -> str:
        return ""


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Path(sys.argv[1]))
