"""``sandboxctl shell`` on a VM sandbox: a command run on one of the guest's virtio consoles as
its terminal, with this process's terminal relayed to it.

The CLI runs ``python -m sandboxctl.drivers.vm.console VM_DIR [--tty] -- COMMAND...`` attached to
the user's terminal, as it runs ``podman exec -it`` for a container: terminal modes are this
program's business. It asks the guest's agent for an interactive session (``I`` in the protocol
of drivers/vm/machine.py) with the terminal's size, puts the local terminal in raw mode (the
guest's tty does the line editing, the echo and the signals: ^C reaches the command as SIGINT),
relays bytes both ways until the agent's end marker, and exits with the command's exit code.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Sequence
from pathlib import Path

from sandboxctl.drivers.vm.machine import ACK_RESEND, ACK_WAIT, END, Guest, Machine, VMError, _list

CHUNK = 64 * 1024


def session(machine: Machine, argv: Sequence[str], stdin_fd: int, stdout_fd: int, rows: int, cols: int) -> int:
    """Run ``argv`` on a free console of ``machine`` as an interactive terminal session, relaying
    ``stdin_fd`` to it and its output to ``stdout_fd``; return the command's exit code."""
    pidfd = machine._pidfd()
    if pidfd is None:
        raise VMError("the VM is not running")
    token = secrets.token_hex(16)
    request = f"\nI {token} {_list(list(argv))} {rows} {cols}\n".encode()
    ack, end = token.encode() + b" ack\n", END + token.encode() + b" "
    try:
        with machine._console(None) as n, contextlib.closing(machine._connect(n)) as sock:
            buf, acked, sent_at, first = b"", False, -ACK_RESEND, time.monotonic()
            inputs = [sock.fileno(), pidfd]
            while True:
                now = time.monotonic()
                if not acked and now - sent_at >= ACK_RESEND:
                    if now - first > ACK_WAIT:
                        raise VMError(f"the VM's agent did not answer within {ACK_WAIT:g} s")
                    sock.sendall(request)
                    sent_at = now
                readable = select.select(inputs + ([stdin_fd] if acked and stdin_fd >= 0 else []), [], [], 0.2)[0]
                if pidfd in readable:
                    raise VMError("the VM stopped during the session")
                if acked and stdin_fd in readable:
                    data = os.read(stdin_fd, CHUNK)
                    # The end of input is the terminal's end of file (^D), which the guest's tty
                    # gives the command; the output is shown until the command ends.
                    sock.sendall(data or b"\x04")
                    if not data:
                        stdin_fd = -1
                if sock.fileno() not in readable:
                    continue
                data = sock.recv(CHUNK)
                if not data:
                    raise VMError("the VM's console closed during the session")
                buf += data
                if not acked:
                    at = buf.find(ack)
                    if at < 0:
                        buf = buf[-len(ack) :]
                        continue
                    acked, buf = True, buf[at + len(ack) :]
                at = buf.find(end)
                if at >= 0:
                    _write(stdout_fd, buf[:at])
                    buf = buf[at:]
                    eol = buf.find(b"\n", len(end))
                    if eol >= 0:
                        return int(buf[len(end) : eol] or b"1")
                    continue
                # Shown at once (a prompt ends in no newline), but for what may begin the end marker.
                held = _held(buf, end)
                _write(stdout_fd, buf[: len(buf) - held])
                buf = buf[len(buf) - held :]
    finally:
        os.close(pidfd)


def _held(buf: bytes, marker: bytes) -> int:
    """How many bytes at the end of ``buf`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:size]):
            return size
    return 0


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def main(args: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    if "--" not in argv or argv.index("--") < 1:
        print("usage: python -m sandboxctl.drivers.vm.console VM_DIR [--tty] -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    directory, flags, command = Path(argv[0]), argv[1:split], argv[split + 1 :] or ["/bin/sh"]
    machine = Machine(directory, Guest(kernel=Path("/nonexistent"), initrd=Path("/nonexistent")))
    size = shutil.get_terminal_size((80, 24))
    raw = "--tty" in flags and os.isatty(0)
    saved = termios.tcgetattr(0) if raw else None
    try:
        if not raw:
            # No terminal here (input from a pipe): the command runs as an exec does, with this
            # input as its standard input, and no terminal of the guest's to echo it.
            data = sys.stdin.buffer.read()
            return machine.exec(command, lambda _, chunk: _write(1, chunk), stdin=data)
        tty.setraw(0)
        return session(machine, command, 0, 1, size.lines, size.columns)
    except VMError as exc:
        print(f"\r\nsandboxctl: {exc}", file=sys.stderr)
        return 1
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


if __name__ == "__main__":
    raise SystemExit(main())
