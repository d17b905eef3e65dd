"""``sandboxctl up`` run as a user runs it, for the tests that need the whole thing: its own
process, its output read line by line, its children found by their pid files, a client as the
local admin, and a small disk of its own to fill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

from sandboxctl.auth import AuthStore
from sandboxctl.client import SandboxClient
from sandboxctl.runtime.supervise import alive
from tests.conftest import ROOT

UP_WAIT = 90.0  # seconds for ``up`` to say it is up: podman's service and a fresh JetStream, on 2 busy cores


def up_env(root: Path, port: int, own_podman: bool = False, podman_url: str = "") -> dict[str, str]:
    """The environment of a user running ``up`` on a data directory of its own; with
    ``own_podman`` up starts (and owns) a podman service, as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXCTL_")}
    env.update(
        SANDBOXCTL_DATA_DIR=str(root / "data"),
        SANDBOXCTL_RUN_DIR=str(root / "run"),
        SANDBOXCTL_NATS_URL=f"nats://127.0.0.1:{port}",
        SANDBOXCTL_DRIVERS="podman",
        SANDBOXCTL_CONSOLE="127.0.0.1:0",  # a free port: several ups never contend for the default
        USER="local-op",
    )
    if not own_podman:
        env["SANDBOXCTL_PODMAN_URL"] = podman_url
    return env


class Up:
    """One ``sandboxctl up`` process, its output (stdout and stderr) collected line by line."""

    def __init__(self, env: dict[str, str], port: int, *args: str) -> None:
        self.env = env
        self.port = port
        self.args = args  # more of up's options
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._more = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def data(self) -> Path:
        return Path(self.env["SANDBOXCTL_DATA_DIR"])

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def start(self) -> Up:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandboxctl.cli", "up", "--port", str(self.port), *self.args, env=self.env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._more.set()
        self._more.set()

    async def line(self, pattern: str, timeout: float = 60.0, after: int = 0) -> str:
        """The first line (from index ``after``) matching the regular expression ``pattern``."""
        found = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for line in self.lines[after:]:
                if found.search(line):
                    return line
            if self._reader is not None and self._reader.done():
                raise AssertionError(f"up ended without {pattern!r}:\n{self.text}")
            self._more.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no line {pattern!r} within {timeout}s:\n{self.text}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._more.wait(), remaining)

    async def up(self) -> Up:
        await self.line("sandboxctl is up", UP_WAIT)
        return self

    async def exit_code(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"up did not exit within {timeout}s:\n{self.text}") from None
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> int:
        """Ctrl-C, and its exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        return await self.exit_code()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def pid_of(self, child: str) -> int:
        """The pid of nats-server (its own pid file) or of the podman service (up's pid file)."""
        path = self.data / ("auth/nats-server.pid" if child == "nats-server" else "podman-service.pid")
        return int(path.read_text().split()[0])

    async def client(self) -> SandboxClient:
        """The local admin, as the README's commands connect."""
        creds = AuthStore(self.data / "auth").credentials("local-op")
        return await SandboxClient.connect(
            self.env["SANDBOXCTL_NATS_URL"], user=creds.user, password=creds.password, max_reconnect_attempts=-1
        )


def listed(pid: int) -> bool:
    """Whether the kernel still lists ``pid`` (a zombie is listed until its parent reaps it)."""
    return os.path.exists(f"/proc/{pid}")


async def until_gone(pid: int, timeout: float = 15.0) -> bool:
    for _ in range(int(timeout / 0.1)):
        if not alive(pid):
            return True
        await asyncio.sleep(0.1)
    return False


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (2**20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler
