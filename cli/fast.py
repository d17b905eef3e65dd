"""The ``sandboxctl`` command's entry: a call handed to a warm interpreter when one runs here.

Starting Python and importing asyncio, nats-py and msgspec is most of a CLI call's time (about
170 ms on a 2-core machine, against about 30 ms for Python importing only its socket module).
``up`` and ``serve`` therefore keep a *fork server* (cli/forkserver.py): a process of the same
user that has imported the command line once and forks a copy of itself for each call.

This module is all a call imports before that: it connects to the fork server's Unix socket in
the run directory, checks that the process behind it is its own user's, hands over its standard
input, output and error (SCM_RIGHTS) with its arguments, environment, working directory and
umask, passes on Ctrl-C (and SIGTERM, SIGHUP, SIGWINCH), and exits with the call's exit code. The
forked copy runs the command line's ``main`` on the caller's own file descriptors, so what is
printed, what sees a terminal, the exit codes and the errors are those of a call without it.

The call runs in this process instead, as it always could, when no fork server answers, when it
is another user's, another interpreter's or another copy of the code's, when the code changed
since it started, when it is busy, for the verbs that hold a terminal or run services
(``LOCAL_VERBS``), and with ``SANDBOXCTL_FAST=0``. ``SANDBOXCTL_FAST=require`` fails instead
(``unavailable``) when the call cannot be handed over: for benchmarks and tests that must measure it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any

FAST_ENV = "SANDBOXCTL_FAST"
SOCKET_NAME = "cli.sock"
# What a call sends at most (arguments and environment): the size of Linux's ARG_MAX.
REQUEST_MAX = 2 * 1024 * 1024
# The verbs that always run in the caller's process: services (which outlive any call), and
# the ones that own a terminal (raw mode, job control, its size as it changes).
LOCAL_VERBS = frozenset({"up", "serve", "exec", "shell", "top"})
# The caller's signals passed on to the call, one byte each.
SIGNAL_BYTES = {
    signal.SIGINT: b"i",
    signal.SIGTERM: b"t",
    signal.SIGHUP: b"h",
    signal.SIGWINCH: b"w",
}
RUN = b"run"  # the fork server's first line: the call runs
FALLBACK = b"fallback"  # ... or this and why: the caller runs it itself
EXIT = b"exit"  # its last line: the call's exit code
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    """The user of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    return int(_CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1])


def package_dir() -> str:
    """The directory of the sandboxctl code this process runs: a fork server runs only calls
    of the same copy of it."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def request(argv: Sequence[str]) -> dict[str, Any]:
    """What a call hands over besides its file descriptors."""
    mask = os.umask(0o077)
    os.umask(mask)
    return {
        "argv": list(argv),
        "argv0": sys.argv[0] if sys.argv else "sandboxctl",
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "umask": mask,
        "python": sys.executable,
        "package": package_dir(),
    }


class _NotHanded(Exception):
    """The call was not handed over (why): it runs in this process."""


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        if peer_uid(sock) != os.geteuid():  # a socket someone else put in our place
            raise _NotHanded(f"the fork server on {path} is another user's")
    except OSError as exc:
        sock.close()
        raise _NotHanded(f"no fork server answers on {path} ({exc.strerror or exc})") from None
    except _NotHanded:
        sock.close()
        raise
    return sock


def _line(reader: Any) -> bytes:
    return bytes(reader.readline(256)).rstrip(b"\n")


def hand_over(argv: Sequence[str], path: str) -> int:
    """Run the call in the fork server on ``path``; its exit code. _NotHanded when it does not run
    there (nothing of it has run)."""
    payload = json.dumps(request(argv)).encode()
    if len(payload) > REQUEST_MAX:
        raise _NotHanded(f"the call's arguments and environment are over {REQUEST_MAX} bytes")
    sock = _connect(path)
    forwarded: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        forwarded.append(signum)
        try:
            sock.send(SIGNAL_BYTES[signal.Signals(signum)])
        except OSError:
            pass

    previous = {signum: signal.signal(signum, forward) for signum in SIGNAL_BYTES}
    reader = sock.makefile("rb")
    try:
        try:
            data = struct.pack("!I", len(payload)) + payload
            sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", (0, 1, 2)))])
            sock.sendall(data[sent:])
            first = _line(reader)
        except OSError as exc:  # a closed standard descriptor (EBADF), the server gone
            raise _NotHanded(f"the fork server did not take the call ({exc.strerror or exc})") from None
        if first != RUN:
            raise _NotHanded(first.decode(errors="replace") or "the fork server closed the call")
        last = _line(reader)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reader.close()
        sock.close()
    word, _, code = last.partition(b" ")
    if word == EXIT and code.isdigit():
        return int(code)
    if forwarded:  # ended by the signal it was sent, as a process of its own would have been
        return 128 + forwarded[-1]
    print("sandboxctl: internal: the call's process ended without an exit code", file=sys.stderr)
    return 1


def main() -> None:
    argv = sys.argv[1:]
    mode = os.environ.get(FAST_ENV, "").strip().lower()
    if mode != "0" and not (argv and argv[0] in LOCAL_VERBS):
        from sandboxctl.runtime.paths import run_dir

        try:
            sys.exit(hand_over(argv, str(run_dir(os.environ) / SOCKET_NAME)))
        except _NotHanded as exc:
            if mode == "require":
                from sandboxctl.cli.output import EXIT_CODES
                from sandboxctl.events.replies import ErrorCode

                print(f"sandboxctl: {ErrorCode.UNAVAILABLE}: {FAST_ENV}=require: {exc}", file=sys.stderr)
                sys.exit(EXIT_CODES[ErrorCode.UNAVAILABLE])
    from sandboxctl.cli.main import main as run_here

    run_here(argv)
