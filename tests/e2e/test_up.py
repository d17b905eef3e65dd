"""``sandboxctl up`` as a user runs it: its own nats-server, every service,
and a clean stop on Ctrl-C; and as a hostile machine treats it: killed with
SIGKILL, its port taken, started twice, its children killed, its disk filled,
its files read by other users, its server's permissions probed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
from pathlib import Path

import nats
import pytest

from sandboxctl.auth import AuthStore
from sandboxctl.cli.status import status
from sandboxctl.client import SandboxError
from sandboxctl.events import subjects
from sandboxctl.runtime.embedded import NatsServer, free_port, nats_server_binary
from sandboxctl.runtime.supervise import alive
from tests.conftest import cli_process, podman
from tests.uprun import Up, fill, listed, until_gone, up_env


async def test_up_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path, podman_url: str, image: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SANDBOXCTL_DATA_DIR": str(tmp_path / "data"),
        "SANDBOXCTL_RUN_DIR": str(tmp_path / "run"),
        "SANDBOXCTL_PODMAN_URL": podman_url,
        "SANDBOXCTL_NATS_URL": f"nats://127.0.0.1:{port}",
    }
    up = await Up(env, port).start()
    name = f"up-{port}"
    try:
        # Lines before the banner are allowed: the shared engine may hold other tests' containers,
        # which up's worker reports as orphans and leaves in place.
        banner = await up.line("sandboxctl is up", 60)
        assert "drivers podman" in banner, banner  # the engines it found
        code, _, err = await cli_process(env, "create", name, "--image", image)
        assert code == 0, err
        code, out, err = await cli_process(env, "get", name, "-o", "json")
        assert code == 0 and json.loads(out)["phase"] == "Ready", err
        code, _, err = await cli_process(env, "delete", name)
        assert code == 0, err
        assert await up.stop() == 0, up.text
        assert "Traceback" not in up.text, up.text
        with pytest.raises(ConnectionRefusedError):  # the embedded nats-server went with it
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await up.kill()
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


# -- up owns what it starts --------------------------------------------------------------------


async def test_its_children_die_with_up_killed_by_sigkill_and_the_next_up_starts_clean(
    tmp_path: Path, image: str, sandboxes: list[str]
) -> None:
    port = free_port()
    env = up_env(tmp_path, port, own_podman=True)
    first = await Up(env, port).start()
    try:
        await first.up()
        server, engine = first.pid_of("nats-server"), first.pid_of("podman")
        assert alive(server) and alive(engine)
        await first.kill()  # SIGKILL: no handler of up's runs
        assert await until_gone(server), f"nats-server {server} outlived up"
        assert await until_gone(engine), f"the podman service {engine} outlived up"
    finally:
        await first.kill()
    again = await Up(env, port).start()
    try:
        await again.up()
        assert "left running" not in again.text, again.text  # nothing was left to stop
        sandboxes.append(f"again-{port}")
        code, _, err = await cli_process(env, "create", sandboxes[0], "--image", image)
        assert code == 0, err
        assert await again.stop() == 0, again.text
    finally:
        await again.kill()


async def test_up_stops_a_server_an_earlier_up_left_running_and_says_which(
    tmp_path: Path, podman_url: str, image: str, sandboxes: list[str]
) -> None:
    """A server whose up died without it (here: started as up starts it, by someone else, so no
    death signal reaches it) holds the port and the store: the next up stops it, says so, and
    runs its own, instead of talking to the orphan and then leaving it behind."""
    port = free_port()
    env = up_env(tmp_path, port, podman_url=podman_url)
    first = await Up(env, port).start()
    try:
        await first.up()
        assert await first.stop() == 0
    finally:
        await first.kill()
    conf = tmp_path / "data" / "nats" / "nats-server.conf"
    orphan = await asyncio.create_subprocess_exec(
        nats_server_binary(), "-c", str(conf),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    up = Up(env, port)
    try:
        for _ in range(200):  # until the orphan listens
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        await up.start()
        await up.up()
        said = await up.line(rf"stopping nats-server \(pid {orphan.pid}\), left running by an earlier sandboxctl up")
        assert str(tmp_path / "data") in said
        await asyncio.wait_for(orphan.wait(), 5)  # stopped (and reaped here, its parent)
        assert up.pid_of("nats-server") != orphan.pid
        sandboxes.append(f"after-orphan-{port}")
        code, _, err = await cli_process(env, "create", sandboxes[0], "--image", image)
        assert code == 0, err
        assert await up.stop() == 0, up.text
    finally:
        await up.kill()
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()


async def test_up_refuses_a_port_another_program_holds_and_never_says_it_is_up(tmp_path: Path, podman_url: str) -> None:
    port = free_port()
    other = NatsServer(tmp_path / "someone-else", port=port).start()  # a server that is not ours
    try:
        up = Up(up_env(tmp_path, port, podman_url=podman_url), port)
        await up.start()
        code = await up.exit_code()
        assert code == 8, up.text
        assert up.lines == [
            f"sandboxctl: unavailable: port {port} is already in use by pid {other.proc.pid} "  # type: ignore[union-attr]
            f"({nats_server_binary()} -c {other.conf_path}); stop what holds it or run sandboxctl up --port N"
        ], up.text
        assert other.answers()  # and it left the other program alone
    finally:
        other.stop()


async def test_a_second_up_on_the_same_data_directory_is_refused(tmp_path: Path, podman_url: str) -> None:
    port = free_port()
    env = up_env(tmp_path, port, podman_url=podman_url)
    first = await Up(env, port).start()
    try:
        await first.up()
        assert first.proc is not None
        other = free_port()
        second = Up({**env, "SANDBOXCTL_NATS_URL": f"nats://127.0.0.1:{other}"}, other)
        await second.start()
        assert await second.exit_code() == 5, second.text
        assert second.lines == [
            f"sandboxctl: failed_precondition: another sandboxctl up (pid {first.proc.pid}) is running on "
            f"{tmp_path / 'data'}; stop it first, or give this one another SANDBOXCTL_DATA_DIR"
        ], second.text
        code, _, err = await cli_process(env, "list")  # the first one is untouched
        assert code == 0, err
        assert await first.stop() == 0, first.text
    finally:
        await first.kill()


# -- supervision of the processes up runs ---------------------------------------------------------


async def test_up_restarts_the_server_and_podman_service_it_started_when_they_are_killed(
    tmp_path: Path, image: str, sandboxes: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    env = up_env(tmp_path, port, own_podman=True)
    up = await Up(env, port).start()
    try:
        await up.up()
        for child, pattern in (("podman", "podman service"), ("nats-server", "nats-server")):
            pid = up.pid_of(child)
            os.kill(pid, signal.SIGKILL)
            await up.line(rf"{pattern} \(pid {pid}\) exited with signal SIGKILL; restarting it")
            back = await up.line(rf"{pattern} is back \(pid \d+, restart 1\)")
            assert not listed(pid)  # reaped: no zombie left
            assert up.pid_of(child) != pid and f"pid {up.pid_of(child)}," in back
        sandboxes.append(f"engine-back-{port}")
        code, _, err = await cli_process(env, "create", sandboxes[0], "--image", image)
        assert code == 0, err
        client = await up.client()  # and up's health answer counts the restarts
        try:
            assert await status(client, "json") == 0
        finally:
            await client.close()
        rows = {r["component"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["podman-service"]["restarts"] == 1 and rows["podman-service"]["status"] == "ok"
        assert rows["nats-server"]["restarts"] == 1 and rows["nats-server"]["pid"] == up.pid_of("nats-server")
        assert await up.stop() == 0, up.text
    finally:
        await up.kill()


async def test_up_restarts_its_server_once_a_full_disk_is_freed(
    tmp_path: Path, small_disk: Path, podman_url: str, image: str, sandboxes: list[str]
) -> None:
    """nats-server 2.15 keeps a stream that failed a write (no space left) refusing every write
    until it restarts, though the disk has room again: up sees it in the server's health, waits
    for free space, restarts its server, and commands work again with the log intact."""
    port = free_port()
    # the projector fails too, on its own full SQLite, and is restarted while the disk is full, as
    # often as it takes: up, which nothing supervises, never gives up
    env = up_env(tmp_path, port, podman_url=podman_url)
    up = await Up(env, port).start()
    client = None
    try:
        await up.up()
        client = await up.client()
        before, after = f"before-full-{port}", f"after-full-{port}"
        sandboxes += [before, after]
        await client.wait_for(before, "Ready", (await client.create(before, image)).seq, timeout=60)
        server = up.pid_of("nats-server")
        filler = fill(small_disk)
        client.request_timeout, client.retries = 8.0, 0
        with pytest.raises(SandboxError):  # the block's last page takes a few events; then a write fails
            for _ in range(500):
                await client.touch(before)
        await up.line(r"nats-server reports a problem: JetStream stream '\$G > SANDBOXCTL_\w+' write error.*no space")
        mark = len(up.lines)
        await up.line(r"nats-server needs a restart: .*waiting for \d+ MiB free on its disk", after=mark - 1)
        assert alive(server) and up.pid_of("nats-server") == server  # no restart onto a full disk
        filler.unlink()
        restart = rf"nats-server \(pid {server}\) is unhealthy \(JetStream stream .*\); \d+ MiB are free; restarting"
        await up.line(restart, 60)
        await up.line(r"nats-server is back \(pid \d+, restart 1\)", 60)
        client.request_timeout, client.retries = 10.0, 5
        await client.wait_for(after, "Ready", (await client.create(after, image)).seq, timeout=90)
        assert (await client.get(before))["phase"] == "Ready"  # the log from before is all there
        await client.close()
        client = None
        assert await up.stop() == 0, up.text
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        await up.kill()


# -- what up writes is private ---------------------------------------------------------------------


async def test_up_keeps_its_data_private_and_tightens_an_existing_directory(
    tmp_path: Path, podman_url: str, image: str, sandboxes: list[str]
) -> None:
    data = tmp_path / "data"
    (data / "nats").mkdir(parents=True)
    data.chmod(0o755)
    (data / "nats").chmod(0o755)
    leaked = data / "projection.sqlite3"  # a projection an earlier version left world-readable
    leaked.touch()
    leaked.chmod(0o644)
    port = free_port()
    env = up_env(tmp_path, port, podman_url=podman_url)
    up = await Up(env, port).start()
    try:
        await up.up()
        said = await up.line(r"made 3 paths under .* private to their owner")
        assert str(data) in said and "projection.sqlite3 644->600" in said
        sandboxes.append(f"private-{port}")
        code, _, err = await cli_process(env, "create", sandboxes[0], "--image", image, "--label", "secret=x")
        assert code == 0, err
        assert await up.stop() == 0, up.text
    finally:
        await up.kill()
    seen = set()
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o077, f"{path} is {mode:o}"
        seen.add(path.relative_to(data).as_posix())
    for name in (
        "projection.sqlite3",
        "up.lock",
        "auth/users.json",
        "nats/nats-server.conf",
        "nats/nats-server.log",
        "nats/jetstream",
    ):
        assert name in seen, sorted(seen)
    assert any(s.startswith("nats/jetstream/jetstream/$G/streams/SANDBOXCTL_LOG/msgs/") for s in seen)


# -- the server's refusals reach the audit stream -----------------------------------------------------


# A client name that would read as an admin's refusal were the server's log line parsed naively.
FAKE_NAME = 'x/user:local-op" - Publish Violation - Subject "sandboxctl.log.framed'


async def test_the_servers_refusals_of_a_reader_reach_the_audit_stream_once(tmp_path: Path, podman_url: str) -> None:
    port = free_port()
    env = up_env(tmp_path, port, podman_url=podman_url)
    up = await Up(env, port).start()
    try:
        await up.up()
        code, _, err = await cli_process(env, "user", "add", "reader", "--role", "sandbox:read")
        assert code == 0, err
        store = AuthStore(up.data / "auth")
        errors: list[str] = []

        async def noted(exc: Exception) -> None:
            errors.append(str(exc))

        for _ in range(50):  # the server admits the new user once it has reloaded
            try:
                reader = await nats.connect(
                    env["SANDBOXCTL_NATS_URL"],
                    error_cb=noted,
                    name=FAKE_NAME,  # the server quotes it in the line: it cannot pass for another user
                    **store.credentials("reader").connect_options(),
                )
                break
            except Exception:
                await asyncio.sleep(0.1)
        try:
            await reader.publish(subjects.log("x"), b"{}")
            await reader.publish(subjects.fact("x"), b"{}")
            await reader.flush()
        finally:
            await reader.close()
        expected = {subjects.log("x"), subjects.fact("x")}
        found: list[dict[str, object]] = []
        for _ in range(50):
            code, out, err = await cli_process(env, "audit", "denied", "-o", "json")
            assert code == 0, err
            found = [d for d in json.loads(out) if d["subject"] in expected]
            if len(found) == 2:
                break
            await asyncio.sleep(0.1)
        assert {d["subject"] for d in found} == expected, found
        assert not [d for d in json.loads(out) if d["user"] != "reader" or "framed" in str(d["subject"])], out
        for record in found:
            assert record["user"] == "reader" and record["action"] == "publish" and record["sandbox"] == "x"
            assert record["roles"] == ["sandbox:read"] and "nats-server refused publish" in str(record["reason"])
        assert await up.stop() == 0, up.text
    finally:
        await up.kill()
    # a restarted up goes on where the last one stopped reading: nothing is recorded twice
    again = await Up(env, port).start()
    try:
        await again.up()
        await asyncio.sleep(1.0)
        code, out, err = await cli_process(env, "audit", "denied", "-o", "json")
        assert code == 0 and len([d for d in json.loads(out) if d["subject"] in expected]) == 2, out
        assert await again.stop() == 0, again.text
    finally:
        await again.kill()
