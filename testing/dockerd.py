"""A docker daemon of sandboxctl's own, for the test suite and for machines
where no system docker runs.

Everything it keeps is under one directory, so several can run side by side
and next to a system docker without seeing each other's containers: its own
socket, data root, exec root (and with it its own containerd), pid file,
configuration and log. It never touches the host's networking: no bridge, no
iptables rules, which sandboxes do not need (they run with ``--network none``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sandboxctl.runtime.supervise import end_child

# sun_path holds 107 bytes and a NUL. The longest socket dockerd puts under its
# exec root is its containerd's ttrpc socket; a longer path makes containerd
# fail to start, which dockerd reports only after a 20 s timeout.
_SUN_PATH_MAX = 107
_LONGEST_EXEC_SOCKET = "/containerd/containerd.sock.ttrpc"


def _short_exec_root(root: Path) -> Path:
    exec_root = root / "exec"
    if len(str(exec_root)) + len(_LONGEST_EXEC_SOCKET) <= _SUN_PATH_MAX:
        return exec_root
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    return base / f"sbx-docker-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


def _dockerd_binary() -> str:
    found = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin:/usr/local/bin")
    if not found:
        raise RuntimeError("dockerd is not installed (Debian: apt-get install docker.io)")
    return found


def _major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\d+)\.", out)
    return int(match.group(1)) if match else 0


class DockerDaemon:
    """``dockerd`` under ``root``, with its own containerd."""

    def __init__(self, root: Path, storage_driver: str | None = None) -> None:
        self.root = root
        self.socket_path = root / "docker.sock"
        self.exec_root = _short_exec_root(root)
        # None lets dockerd pick (overlay2 where the data root's filesystem
        # allows it, vfs as the last resort); "vfs" works everywhere, slowly.
        self.storage_driver = storage_driver
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    def answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(str(self.socket_path))
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b"200" in s.recv(64)
        except OSError:
            return False

    def _config(self, binary: str) -> Path:
        """A configuration file of its own, so the host's /etc/docker/daemon.json
        cannot conflict with the flags; before docker 23 it is also the only way to
        keep the trust key dockerd insists on writing out of /etc/docker."""
        config: dict[str, str] = {}
        if 0 < _major_version(binary) < 23:
            config["deprecated-key-path"] = str(self.root / "key.json")
        path = self.root / "daemon.json"
        path.write_text(json.dumps(config) + "\n")
        return path

    def command(self, binary: str) -> list[str]:
        cmd = [
            binary,
            f"--config-file={self._config(binary)}",
            f"--host={self.url}",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.root / 'docker.pid'}",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
        ]
        if self.storage_driver:
            cmd.append(f"--storage-driver={self.storage_driver}")
        return cmd

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 60) -> DockerDaemon:
        if self.answers():
            return self
        if len(str(self.socket_path)) > _SUN_PATH_MAX:
            raise RuntimeError(f"{self.socket_path} is too long for a unix socket; use a shorter root")
        binary = _dockerd_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as logfile:
            # A session of its own, so a signal meant for sandboxctl (Ctrl-C)
            # does not reach dockerd before sandboxctl stops it in order.
            self.proc = subprocess.Popen(
                self.command(binary), stdout=logfile, stderr=logfile, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # it may have started its containerd before it gave up
                raise RuntimeError(f"dockerd exited with code {code}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not answer within {timeout}s:\n{self._log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stops dockerd the way it wants to be stopped: on SIGTERM it stops the
        containers (within its shutdown timeout, 15 s by default), then its
        containerd. Only if that does not finish in time is everything it left
        killed: containerd, the shims and the containers, which are not in its
        process group (containerd and each shim start sessions of their own)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        end_child(proc, timeout)
        leftovers = self._leftover_pids()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._unmount_leftovers()
        if leftovers:
            (self.root / "docker.pid").unlink(missing_ok=True)
            self.socket_path.unlink(missing_ok=True)
        if self.exec_root.parent != self.root:
            shutil.rmtree(self.exec_root, ignore_errors=True)

    def _leftover_pids(self) -> list[int]:
        """containerd and its shims name this exec root on their command lines;
        the containers' processes are the shims' descendants."""
        marker = f"{self.exec_root}/containerd/".encode()
        children: dict[int, list[int]] = {}
        found: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
            if marker in cmdline:
                found.append(int(entry.name))
        for pid in found:  # grows while it is walked: a breadth-first walk down the tree
            found.extend(c for c in children.get(pid, []) if c not in found)
        return found

    def _unmount_leftovers(self) -> None:
        """A killed daemon leaves its containers' root filesystems, shm and
        network namespaces mounted, and one that failed to start can leave its
        data root bind-mounted on itself; either keeps ``root`` from being removed."""
        prefixes = (f"{self.root}/", f"{self.exec_root}/")
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return
        points = [line.split()[4] for line in mountinfo.splitlines() if len(line.split()) > 4]
        for point in sorted((p for p in points if p.startswith(prefixes)), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
