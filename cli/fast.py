"""The ``sandboxctl`` command's entry: a call handed to a warm interpreter when one runs here.

Starting Python and importing asyncio, nats-py and msgspec is most of a CLI call's time (about
170 ms on a 2-core machine, against about 30 ms for Python importing only its socket module).
``up`` and ``serve`` therefore keep a *fork server* (cli/forkserver.py): a process of the same
user that has imported the command line once and forks a copy of itself for each call.

This module is all a call imports before that. It checks the fork server's socket in the run
directory (a socket of its own user's, in a directory only that user may write), checks that
the process behind it is its own user's (SO_PEERCRED), and hands over its standard input, output
and error and its working directory (SCM_RIGHTS) with its arguments, environment, umask and the
signals it ignores. It then passes on Ctrl-C, SIGTERM, SIGHUP and SIGWINCH, stops the call with
itself on Ctrl-Z (SIGSTOP, then SIGCONT, to the call's process, its own user's), and ends as the
call ended: with its exit code, or by the same signal. The forked copy runs the command line's
``main`` on the caller's own descriptors and stream encodings, so what is printed, what sees a
terminal, the exit codes and the errors are those of a call without it.

The call runs in this process instead, as it always could, whenever it cannot be handed over
whole: no fork server answers (within ``HANDSHAKE_WAIT``), it is another user's, another
interpreter's or another copy of the code's, the code changed since it started, it is busy, the
caller's groups, namespaces or confinement differ from the server's, a standard descriptor is
closed, the caller is in the background of its terminal, for the verbs in ``LOCAL_VERBS``, and
with ``SANDBOXCTL_FAST=0``. Nothing of a call runs in the fork server until the caller has said
go, so a call never runs twice. ``SANDBOXCTL_FAST=require`` fails instead (``unavailable``) when
the call cannot be handed over: for benchmarks and tests that must measure it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any

FAST_ENV = "SANDBOXCTL_FAST"
SOCKET_NAME = "cli.sock"
# What a call sends at most (arguments and environment): the size of Linux's ARG_MAX.
REQUEST_MAX = 2 * 1024 * 1024
# Seconds a fork server has to take a call and say it runs it; then the caller runs its own.
HANDSHAKE_WAIT = 5.0
# The verbs that always run in the caller's process: services (which outlive any call), the
# ones that own a terminal (raw mode, its size as it changes), and the one that may prompt for a
# password on the controlling terminal.
LOCAL_VERBS = frozenset({"up", "serve", "exec", "shell", "top", "user"})
# The caller's signals passed on to the call, one byte each.
SIGNAL_BYTES = {
    signal.SIGINT: b"i",
    signal.SIGTERM: b"t",
    signal.SIGHUP: b"h",
    signal.SIGWINCH: b"w",
}
GO = b"g"  # the caller's word that the call may run, once the server has said it would
RUN = b"run"  # the fork server's first line, with the call's pid: it runs the call, once told to go
FALLBACK = b"fallback"  # ... or this and why: the caller runs it itself
EXIT = b"exit"  # the last line: the call's exit code
KILLED = b"signal"  # ... or the signal that ended it
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The pid, user and group of the process at the other end of a Unix socket (SO_PEERCRED)."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return int(pid), int(uid), int(gid)


def package_dir() -> str:
    """The directory of the sandboxctl code this process runs: a fork server runs only calls
    of the same copy of it."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NotHanded(Exception):
    """The call was not handed over (why); nothing of it has run."""


def _ours(path: str, mode_check: int) -> None:
    """``path`` is this user's, not a symlink, and no one else may write to it."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise NotHanded(f"no fork server on {path} ({exc.strerror or exc})") from None
    if st.st_uid != os.geteuid() or stat.S_IFMT(st.st_mode) != mode_check or st.st_mode & 0o022:
        raise NotHanded(f"{path} is not a private {'socket' if mode_check == stat.S_IFSOCK else 'directory'} of ours")


def _standard_descriptors() -> None:
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            raise NotHanded(f"descriptor {fd} is closed") from None
        if os.isatty(fd):
            try:
                foreground = os.tcgetpgrp(fd) == os.getpgrp()
            except OSError:  # not our controlling terminal: no job control between us
                foreground = True
            if not foreground:
                raise NotHanded("the call runs in the background of its terminal")


def _request(argv: Sequence[str], ignored: list[int]) -> bytes:
    mask = os.umask(0o077)
    os.umask(mask)
    payload = json.dumps(
        {
            "argv": list(argv),
            "argv0": sys.argv[0] if sys.argv else "sandboxctl",
            "env": dict(os.environ),
            "umask": mask,
            "ignored": ignored,
            "utf8_mode": sys.flags.utf8_mode,
            "streams": [
                [getattr(f, "encoding", None), getattr(f, "errors", None)] for f in (sys.stdin, sys.stdout, sys.stderr)
            ],
            "python": sys.executable,
            "package": package_dir(),
        }
    ).encode()
    if len(payload) > REQUEST_MAX:
        raise NotHanded(f"the call's arguments and environment are over {REQUEST_MAX} bytes")
    return struct.pack("!I", len(payload)) + payload


class _Caller:
    """One call handed over: its socket, and the signals it passes on."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = 0  # the call's process, once it runs
        self.pidfd = -1  # ... held, so that a stop or a go-on never reaches another process
        self.stopping = False
        self.pending: list[int] = []  # signals that came before it ran
        self.previous: dict[int, Any] = {}

    def catch(self) -> list[int]:
        """Pass on the signals this process does not ignore; the ones it ignores."""
        ignored = []
        for signum in (*SIGNAL_BYTES, signal.SIGTSTP):
            if signal.getsignal(signum) == signal.SIG_IGN:
                ignored.append(int(signum))
            else:
                self.previous[signum] = signal.signal(signum, self.forward)
        return ignored

    def release(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def forward(self, signum: int, _frame: Any) -> None:
        if not self.pid:
            self.pending.append(signum)
            return
        if signum == signal.SIGTSTP:  # stop with the call, and go on with it
            if self.stopping:  # a second Ctrl-Z while stopping: one stop
                return
            self.stopping = True
            try:
                self._signal(signal.SIGSTOP)  # the call first: its SIGCONT can never come before its stop
                signal.signal(signal.SIGTSTP, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTSTP)  # returns once continued
                signal.signal(signal.SIGTSTP, self.forward)
                self._signal(signal.SIGCONT)
            finally:
                self.stopping = False
            return
        self._send(SIGNAL_BYTES[signal.Signals(signum)])

    def _signal(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except OSError:  # it has ended
            pass

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            pass


def _line(reader: Any) -> bytes:
    return bytes(reader.readline(256)).rstrip(b"\n")


def hand_over(argv: Sequence[str], path: str) -> int:
    """Run the call in the fork server on ``path``; how it ended (an exit code, or the process
    ends by the signal that ended the call). NotHanded when it was not handed over."""
    if not hasattr(socket, "SO_PEERCRED") or not hasattr(socket, "SCM_RIGHTS"):
        raise NotHanded("this system cannot pass credentials and descriptors over a socket")
    _standard_descriptors()
    _ours(os.path.dirname(path), stat.S_IFDIR)
    _ours(path, stat.S_IFSOCK)
    try:
        here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise NotHanded(f"the working directory: {exc.strerror or exc}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    caller = _Caller(sock)
    reader = sock.makefile("rb")
    try:
        try:
            sock.settimeout(HANDSHAKE_WAIT)
            sock.connect(path)
            if peer_credentials(sock)[1] != os.geteuid():  # a socket someone else put in our place
                raise NotHanded(f"the fork server on {path} is another user's")
            data = _request(argv, caller.catch())
            try:
                sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", (0, 1, 2, here)))])
                sock.sendall(data[sent:])
            except BrokenPipeError:  # refused before the whole request was read: its line says why
                pass
            word, _, pid = _line(reader).partition(b" ")
            if word != RUN or not pid.isdigit():
                raise NotHanded((word + b" " + pid).decode(errors="replace").strip() or "the fork server said nothing")
            sock.sendall(GO)
        except OSError as exc:  # the server gone or silent: it was not told to go, so it does not run
            raise NotHanded(f"the fork server on {path} did not take the call ({exc.strerror or exc})") from None
        sock.settimeout(None)
        try:
            caller.pidfd = os.pidfd_open(int(pid))
        except OSError:  # it has ended already: its line says how
            pass
        caller.pid = int(pid)
        for signum in caller.pending:
            caller.forward(signum, None)
        word, _, number = _line(reader).partition(b" ")
        if word == FALLBACK:  # it had given up waiting for the go: it never ran
            caller.pid = 0
            raise NotHanded(number.decode(errors="replace"))
    except NotHanded:
        caller.release()
        _raise_pending(caller.pending)
        raise
    finally:
        os.close(here)
        if caller.pidfd >= 0:
            os.close(caller.pidfd)
        reader.close()
        sock.close()
    caller.release()
    if word == EXIT and number.isdigit():
        return int(number)
    if word == KILLED and number.isdigit():  # end as the call ended, as a shell sees a process end
        signum = int(number)
        try:
            if signum not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        except (OSError, ValueError):  # not a signal this process can take: its status says it
            pass
        return 128 + signum
    print("sandboxctl: internal: the call's process ended without an exit code", file=sys.stderr)
    return 1


def _raise_pending(pending: list[int]) -> None:
    """The signals that came while the call was being handed over, delivered here after all."""
    for signum in pending:
        if signal.getsignal(signum) is signal.default_int_handler:
            sys.exit(130)  # Ctrl-C before anything ran: nothing to undo
        signal.raise_signal(signum)


def main() -> None:
    argv = sys.argv[1:]
    mode = os.environ.get(FAST_ENV, "").strip().lower()
    if mode != "0" and not (argv and argv[0] in LOCAL_VERBS):
        from sandboxctl.runtime.paths import run_dir

        try:
            sys.exit(hand_over(argv, str(run_dir(os.environ) / SOCKET_NAME)))
        except NotHanded as exc:
            if mode == "require":
                from sandboxctl.cli.output import EXIT_CODES
                from sandboxctl.events.replies import ErrorCode

                print(f"sandboxctl: {ErrorCode.UNAVAILABLE}: {FAST_ENV}=require: {exc}", file=sys.stderr)
                sys.exit(EXIT_CODES[ErrorCode.UNAVAILABLE])
    from sandboxctl.cli.main import main as run_here

    run_here(argv)
