"""A sandboxctl service in a process of its own (``sandboxctl serve --only ...``), as a deployment
runs it: started and waited for until it says it is up, killed with SIGKILL, stopped with SIGTERM,
its output in a log file of its own. The fault suites and the replica benchmark use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Service:
    """One sandboxctl service in a process of its own, killed with SIGKILL when asked."""

    def __init__(self, component: str, env: dict[str, str], logs: Path, name: str = "") -> None:
        self.component = component  # what serve --only runs: one service, or several comma-separated
        self.name = name or component  # a replica's own name, for its log
        self.env = env
        self.log_path = logs / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        banner_count = self._banners()
        with open(self.log_path, "ab") as logfile:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "sandboxctl"), "serve", "--only", self.component],
                env=self.env,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + 60
        while self._banners() == banner_count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.component} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.component} did not come up:\n{self.tail()}")
            time.sleep(0.05)

    def _banners(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("sandboxctl services are up")
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
