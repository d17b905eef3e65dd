"""What the command line says against a real nats-server and no engine: a wrong password is
``unauthenticated`` (exit 13), ``user remove`` shuts a user out of a running server, and a reader
that goes away is a broken pipe (exit 141), never ``unavailable``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

import nats
import pytest

from bench.replay import fill
from sandboxctl.auth import WRITE, AuthStore, component_user
from sandboxctl.client import EXIT_STATUS, ClientCode
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer
from tests.conftest import CLI, ROOT


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
