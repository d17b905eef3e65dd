"""Health and position, against a real nats-server and podman: every process that runs
services answers ``sandboxctl.health``; ``status`` shows each service's position against
the log's head and exits non-zero when one is behind or down; with users on the server,
a reader may ask, a user without a role may not, and an answer never lands on a stream.
``status`` with no process at all is tests/integration/test_health.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

import sandboxctl.runtime.health
import sandboxctl.services.projector
from sandboxctl.auth import READ, AuthStore, component_user
from sandboxctl.cli.status import status
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config, default_host_name
from sandboxctl.runtime.embedded import ControlPlane, NatsServer
from sandboxctl.runtime.health import HEALTH

LOGGED = ("statemachine", "projector", "reaper")  # the services that keep a position in the log


@pytest.fixture
def config(podman_config: Config) -> Config:
    """The suite's plane and client (tests/conftest.py), on podman alone."""
    return podman_config


async def last_seq(nc: nats.NATS) -> int:
    return int((await nc.jetstream().stream_info(subjects.LOG_STREAM)).state.last_seq)


async def test_status_shows_each_service_with_its_position_against_the_log(
    plane: ControlPlane, client: SandboxClient, names, image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = names.new()
    await client.wait_for(name, "Ready", (await client.create(name, image)).seq)
    head = await last_seq(client.nc)
    for _ in range(50):  # the reaper and the state machine fold the last events a moment later
        capsys.readouterr()
        code = await status(client, "json")
        rows = json.loads(capsys.readouterr().out)
        if all(r["position"] == head for r in rows if r["component"] in LOGGED):
            break
        await asyncio.sleep(0.1)
    assert code == 0
    assert sorted(r["component"] for r in rows) == [
        "driver-podman",
        "host",
        "projector",
        "query",
        "reaper",
        "statemachine",
        "webhooks",  # with no webhook it reads nothing: no position, healthy
    ]
    for row in rows:
        assert row["healthy"] and row["status"] == "ok", row
        assert row["pid"] == os.getpid() and row["host"] == socket.gethostname() and row["restarts"] == 0
        assert row["last_seq"] == head
        if row["component"] in LOGGED:
            assert row["position"] == head and row["lag"] == 0, row
    code = await status(client, "table")
    table = capsys.readouterr().out.splitlines()
    assert code == 0 and table[0].split()[:5] == ["COMPONENT", "STATUS", "POSITION", "LAST_SEQ", "LAG"]
    projector = next(line for line in table if line.startswith("projector")).split()
    assert projector[1:5] == ["ok", str(head), str(head), "0"]


async def test_a_frozen_projector_is_behind_status_exits_non_zero_and_it_catches_up(
    plane: ControlPlane,
    client: SandboxClient,
    names,
    image: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sandboxctl.runtime.health, "BEHIND_AFTER", 1.0)
    write = sandboxctl.services.projector._write_batch
    thawed = threading.Event()

    def frozen(*args: object) -> None:  # a write that hangs (a stalled disk): the projector's task lives on
        thawed.wait(60)
        write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sandboxctl.services.projector, "_write_batch", frozen)
    name = names.new()
    caplog.set_level(logging.INFO, logger="sandboxctl.runtime.health")
    try:
        reply = await client.create(name, image)
        await asyncio.sleep(2.5)  # past BEHIND_AFTER, and a look of the process's own watch
        capsys.readouterr()
        code = await status(client, "json")
        captured = capsys.readouterr()
        rows = {r["component"]: r for r in json.loads(captured.out)}
        projector = rows["projector"]
        assert code == 8, captured
        assert projector["status"] == "behind" and not projector["healthy"], projector
        assert projector["lag"] > 0 and projector["position"] < projector["last_seq"]
        assert "not moving" in projector["reason"]
        assert captured.err.startswith("sandboxctl: unavailable: 1 not healthy: projector (behind"), captured.err
        assert rows["statemachine"]["status"] == "ok"  # only the frozen one
        assert any(r.getMessage().startswith("projector is behind the log") for r in caplog.records)
    finally:
        thawed.set()
    await client.wait_for(name, "Ready", reply.seq, timeout=60)
    for _ in range(50):
        capsys.readouterr()
        if await status(client, "json") == 0:
            break
        await asyncio.sleep(0.2)
    rows = {r["component"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["projector"]["status"] == "ok" and rows["projector"]["lag"] == 0
    for _ in range(30):  # the process says so too
        if any(r.getMessage().startswith("projector has caught up") for r in caplog.records):
            break
        await asyncio.sleep(0.1)
    assert any(r.getMessage().startswith("projector has caught up") for r in caplog.records)


# -- with users on the server -------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> AuthStore:
    store = AuthStore(tmp_path / "auth")
    store.provision("ops", default_host_name())
    store.add("reader", [READ])
    store.add("nobody", [])
    return store


def auth_config(tmp_path: Path, server: NatsServer, store: AuthStore, podman_url: str, data: str = "data") -> Config:
    return Config(
        nats_url=server.url,
        data_dir=tmp_path / data,
        run_dir=tmp_path / "run",
        podman_url=podman_url,
        drivers=("podman",),
        default_driver="podman",
        auth_dir=store.root,
    )


@pytest.fixture
async def auth_plane(
    tmp_path: Path, auth_server: NatsServer, store: AuthStore, podman_url: str
) -> AsyncIterator[ControlPlane]:
    plane = await ControlPlane(auth_config(tmp_path, auth_server, store, podman_url)).start()
    assert plane.auth_enabled
    yield plane
    await plane.stop()


async def connect(url: str, store: AuthStore, user: str) -> SandboxClient:
    creds = store.credentials(user)
    return await SandboxClient.connect(url, user=creds.user, password=creds.password)


async def test_with_users_a_reader_may_ask_and_a_user_without_a_role_may_not(
    tmp_path: Path,
    auth_server: NatsServer,
    auth_plane: ControlPlane,
    store: AuthStore,
    podman_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a second process with a projector only (``serve --only projector``): it answers as that
    # user, whose permissions must be enough for it, and the caller hears both processes
    config = auth_config(tmp_path, auth_server, store, podman_url, data="data-2")
    alone = await ControlPlane(config, components=("projector",)).start()
    reader = await connect(auth_server.url, store, "reader")
    nobody = await connect(auth_server.url, store, "nobody")
    try:
        code = await status(reader, "json")
        rows = json.loads(capsys.readouterr().out)
        assert code == 0 and [r["component"] for r in rows].count("projector") == 2, rows
        assert all(r["status"] == "ok" for r in rows), rows
        code = await status(reader, "yaml")
        out = capsys.readouterr().out
        assert code == 0 and "component: projector" in out and "status: ok" in out, out
        code = await status(nobody, "table")
        err = capsys.readouterr().err
        assert code == 11 and err.startswith("sandboxctl: permission_denied: user nobody may not ask"), err
    finally:
        await reader.close()
        await nobody.close()
        await alone.stop()


async def test_a_health_answer_never_lands_on_a_stream_whatever_reply_subject_is_asked(
    auth_server: NatsServer, auth_plane: ControlPlane, store: AuthStore
) -> None:
    """The asker names the reply subject, and the process answers as one of its services' users,
    which may publish where that service writes: asked to answer onto the log, it must not."""
    reader = await connect(auth_server.url, store, "reader")
    watcher = await nats.connect(auth_server.url, **store.credentials(component_user("statemachine")).connect_options())
    try:
        before = await last_seq(watcher)
        for target in (subjects.log("forged"), subjects.fact("forged"), subjects.denied("forged")):
            await reader.nc.publish(HEALTH, b"", reply=target)
        await reader.nc.flush()
        await asyncio.sleep(1.0)
        assert await last_seq(watcher) == before
        for stream, subject in (
            (subjects.FACTS_STREAM, subjects.fact("forged")),
            (subjects.AUDIT_STREAM, subjects.denied("forged")),
        ):
            info = await watcher.jetstream().stream_info(stream, subjects_filter=subject)
            assert not info.state.subjects, (stream, info.state.subjects)
    finally:
        await reader.close()
        await watcher.close()
