"""``sandboxctl shell`` on a VM sandbox: a command run on one of the guest's virtio consoles as
its terminal, with this process's terminal relayed to it.

The CLI runs ``python -m sandboxctl.drivers.vm.console VM_DIR [--tty] -- COMMAND...`` attached to
the user's terminal, as it runs ``podman exec -it`` for a container: terminal modes are this
program's business. It asks the guest's agent for an interactive session (``I`` in the protocol
of drivers/vm/machine.py) with the terminal's size, puts the local terminal in raw mode (the
guest's tty does the line editing, the echo and the signals: ^C reaches the command as SIGINT),
relays bytes both ways until the agent's end marker (``Machine.session``), and exits with the
command's exit code.
"""

from __future__ import annotations

import os
import shutil
import sys
import termios
import tty
from collections.abc import Sequence
from pathlib import Path

from sandboxctl.drivers.vm.machine import Guest, Machine, VMError


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
        return machine.session(command, 0, lambda _, chunk: _write(1, chunk), size.lines, size.columns)
    except VMError as exc:
        print(f"\r\nsandboxctl: {exc}", file=sys.stderr)
        return 1
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


if __name__ == "__main__":
    raise SystemExit(main())
