"""What the command line refuses, and how it says so: bad input is ``invalid_argument`` (exit 2)
before anything is sent, ``delete --all`` is confirmed by a person or by ``--yes``, a wrong
password is ``unauthenticated`` (exit 13), and ``user remove`` shuts a user out of a running
server. Against a real nats-server (with users where it matters) and the real services."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pty
import sys
from pathlib import Path

import nats
import pytest

from bench.replay import fill
from sandboxctl.auth import WRITE, AuthStore, component_user
from sandboxctl.client import EXIT_STATUS, ClientCode
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer, free_port
from tests.conftest import CLI, ROOT, phase

NOBODY_LISTENS = Config(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=Path("/nonexistent"), actor="test")

REFUSED = [
    (("stop", "a", "--timeout", "-3"), "--timeout must be more than 0 and at most 86400 seconds, not -3"),
    (("stop", "a", "--timeout", "0"), "--timeout must be more than 0"),
    (("start", "a", "--timeout", "inf"), "--timeout must be more than 0 and at most 86400 seconds, not inf"),
    (("stop", "a", "--grace", "nan"), "--grace must be from 0 to 3600 seconds, not nan"),
    (("stop", "a", "--grace", "inf"), "--grace must be from 0 to 3600 seconds, not inf"),
    (("stop", "a", "--grace", "1e300"), "--grace must be from 0 to 3600 seconds, not 1e+300"),
    (("stop", "a", "--grace", "-1"), "--grace must be from 0 to 3600 seconds, not -1"),
    (("stop", "a", "--grace", "ten"), "argument --grace: invalid float value: 'ten'"),
    (("stop", "a", "a"), "sandbox a is named twice"),
    (("delete", "a", "b", "a"), "sandbox a is named twice"),
    (("stop",), "stop needs at least one NAME, or --all"),
    (("stop", "a", "--all"), "give names or --all, not both"),
    (("stop", "a.b"), "invalid sandbox name 'a.b'"),
    (("get", "x" * 64), "invalid sandbox name"),
    (("list", "--phase", "Bogus"), "unknown phase 'Bogus'; phases are Provisioning, Ready, Stopping, Stopped"),
    (("list", "--label", "bad key=x"), "label key 'bad key'"),
    (("create", "a", "--image", "i", "--label", "k=" + "v" * 257), "label k: the value is longer than 256"),
    (("create", "a", "--image", "i", "--label", "k" * 129 + "=v"), "label key 'kkkk"),
    (("create", "a", "--image", "i", *(f"--label=k{i}=v" for i in range(65))), "65 labels: at most 64"),
    (("create", "a", "--image", "i", "--label", "k=1", "--label", "k=2"), "label k is given twice"),
    (("create", "a", "--image", "i", "--label", "novalue"), "label 'novalue' is not KEY=VALUE"),
    (("create", "a", "--image", "i", "--idle-timeout", "400d"), "--idle-timeout must be from 0 to 31622400"),
    (("create", "a", "--image", "i", "--auto-delete-after=-1d"), "--auto-delete-after: bad duration '-1d'"),
    (("lease", "acquire", "a", "--ttl", "0"), "--ttl must be more than 0 and at most 86400 seconds, not 0"),
    (("lease", "renew", "a", "--ttl", "2d"), "--ttl must be more than 0 and at most 86400 seconds, not 172800"),
    (("hold", "a", "--reason", "r" * 513), "--reason is longer than 512 characters"),
    (("top", "--interval", "nan"), "--interval must be more than 0"),
    (("exec", "a", "--timeout", "-1", "--", "true"), "--timeout must be more than 0"),
    (("frobnicate",), "argument cmd: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "reason"), REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
async def test_bad_input_is_invalid_argument_before_anything_is_sent(
    argv: tuple[str, ...], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No NATS listens at the configured address: any attempt to send would be ``unavailable``."""
    code, _, err = await CLI(NOBODY_LISTENS, capsys)(*argv)
    assert (code, err.count("\n")) == (2, 1), err
    assert err.startswith("sandboxctl: invalid_argument: ") and reason in err, err


async def _cli_on_a_terminal(config: Config, answer: str, *argv: str) -> tuple[int, str, str]:
    """The console script in its own process, its stdin a terminal on which ``answer`` is typed."""
    master, slave = pty.openpty()
    env = {**os.environ, "SANDBOXCTL_NATS_URL": config.nats_url, "SANDBOXCTL_DATA_DIR": str(config.data_dir)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", *argv, env=env, cwd=ROOT,
        stdin=slave, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(slave)
    try:
        os.write(master, answer.encode())
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        os.close(master)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_delete_all_asks_a_person_and_refuses_a_script_without_yes(
    cli: CLI, config: Config, names, image: str
) -> None:
    made = [names.new() for _ in range(2)]
    for name in made:
        assert (await cli("create", name, "--image", image, "--no-wait"))[0] == 0

    code, _, err = await cli("delete", "--all")  # stdin is not a terminal here
    assert code == 2 and err.startswith("sandboxctl: invalid_argument: delete --all would delete 2 sandboxes"), err
    assert "say --yes" in err
    code, _, err = await _cli_on_a_terminal(config, "no\n", "delete", "--all")
    assert code == 5 and "deletes 2 sandboxes (" in err and "DESTROYS THEIR WORKSPACES" in err, err
    assert err.rstrip().endswith("sandboxctl: failed_precondition: not confirmed: nothing was deleted"), err
    for name in made:
        assert await phase(cli, name) != "Deleted"

    code, out, err = await _cli_on_a_terminal(config, "yes\n", "delete", "--all")
    assert code == 0 and out == "2 sandboxes deleted\n", (out, err)
    for name in made:
        assert await phase(cli, name) == "Deleted"
    code, out, err = await cli("delete", "--all")  # nothing left to delete: nothing to ask
    assert code == 0 and out == "no sandbox to delete\n", err


@pytest.fixture
def store(tmp_path: Path) -> AuthStore:
    store = AuthStore(tmp_path / "auth")
    store.provision("ops")
    return store


async def test_a_wrong_password_is_unauthenticated_and_a_removed_user_is_shut_out(
    tmp_path: Path, store: AuthStore, capsys: pytest.CaptureFixture[str]
) -> None:
    server = NatsServer(tmp_path / "nats", auth=store).start()
    config = Config(nats_url=server.url, data_dir=tmp_path / "data", auth_dir=store.root, drivers=("podman",))
    plane = await ControlPlane(config, components=("statemachine", "projector", "query")).start()
    ops = CLI(dataclasses.replace(config, **_login(store, "ops")), capsys)
    try:
        code, _, err = await CLI(dataclasses.replace(config, user="ops", password="wrong"), capsys)("list")
        assert code == EXIT_STATUS[ClientCode.UNAUTHENTICATED] == 13, err
        assert err.startswith("sandboxctl: unauthenticated: NATS at ") and "did not accept user ops" in err, err

        code, out, err = await ops("user", "add", "bob", "--role", WRITE)
        assert code == 0, err
        bob = CLI(dataclasses.replace(config, **_login(store, "bob")), capsys)
        assert await _until(bob, 0) == 0
        code, out, err = await ops("user", "remove", "bob")
        assert code == 0 and out.startswith("user bob removed"), err
        assert not store.credentials_path("bob").exists() and "bob" not in store.load()
        assert "bob" not in json.dumps(store.server_conf_path.read_text())
        assert await _until(bob, 13) == 13  # the running server was made to reload its users

        code, _, err = await ops("user", "remove", "bob")
        assert code == 3 and "sandboxctl: not_found: no user 'bob'" in err, err
        code, _, err = await ops("user", "remove", component_user("query"))
        assert code == 2 and "cannot be removed" in err, err
        assert store.credentials_path(component_user("query")).exists()
        code, out, _ = await ops("list", "-o", "json")
        assert code == 0 and json.loads(out) == []
    finally:
        await plane.stop()
        server.stop()


def _login(store: AuthStore, user: str) -> dict[str, str]:
    creds = store.credentials(user)
    return {"user": creds.user, "password": creds.password}


async def _until(cli: CLI, code: int) -> int:
    """Run ``list`` until it exits with ``code`` (the server reloads its users a moment after the signal)."""
    got = -1
    for _ in range(50):
        got = (await cli("list"))[0]
        if got == code:
            break
        await asyncio.sleep(0.1)
    return got


async def test_a_reader_that_goes_away_is_a_broken_pipe_not_unavailable(nats_server: NatsServer) -> None:
    """`sandboxctl events | head -1`: the reader closes the pipe while the CLI still writes; that is
    said in one line and exit 141, as a shell reports SIGPIPE, never as `unavailable`."""
    nc = await nats.connect(nats_server.url)
    try:
        await fill(nc, 20_000, 100)  # megabytes of events to print
    finally:
        await nc.close()
    env = {**os.environ, "SANDBOXCTL_NATS_URL": nats_server.url, "SANDBOXCTL_DATA_DIR": "/nonexistent"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "events", "-o", "json", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    await proc.stdout.readline()
    proc.stdout.feed_eof()
    proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]  # like head, once it has a line
    err = (await asyncio.wait_for(proc.stderr.read(), 60)).decode()
    assert await proc.wait() == 141, err
    assert err.startswith("sandboxctl: broken_pipe: ") and len(err.strip().splitlines()) == 1, err
