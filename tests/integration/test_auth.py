"""Authorization against a real nats-server that admits only its users, with the permissions
sandboxctl.auth generates, and the services that drive no engine: who may do what is checked by
the server and by the state machine, never by a fake. The same with the whole plane on podman is
tests/e2e/test_auth.py."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from bench.replay import fill
from sandboxctl.auth import Authorizer, AuthStore, component_user
from sandboxctl.bus import snapshots
from sandboxctl.client import PermissionDenied, SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.commands import command_decoder
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer
from sandboxctl.services.projector import Projector
from sandboxctl.services.statemachine import StateMachineService
from testing.hosts import announce_host
from tests.authkit import ADMIN_USER, Figures, Raw, count, make_store, role_clients
from tests.authkit import auth_config as auth_config_for


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield from Figures.reported()


@pytest.fixture
def store(tmp_path: Path) -> AuthStore:
    return make_store(tmp_path / "auth")


@pytest.fixture
def auth_config(tmp_path: Path, auth_server: NatsServer, store: AuthStore) -> Config:
    return auth_config_for(tmp_path, auth_server.url, store)


@pytest.fixture
async def auth_plane(auth_config: Config) -> AsyncIterator[ControlPlane]:
    """Every service but the driver workers: commands are decided and logged, no engine is asked."""
    plane = await ControlPlane(auth_config, components=("statemachine", "projector", "query")).start()
    assert plane.auth_enabled
    worker = plane.auth.credentials(component_user("driver-podman")).connect_options()
    await announce_host(auth_config.nats_url, auth_config.host, **worker)  # where its creates are placed
    yield plane
    await plane.stop()


@pytest.fixture
def sandbox() -> str:
    return f"auth-{uuid.uuid4().hex[:8]}"  # no worker runs: no container is made for it


@pytest.fixture
async def clients(
    auth_config: Config, auth_plane: ControlPlane, store: AuthStore
) -> AsyncIterator[dict[str, SandboxClient]]:
    async for made in role_clients(auth_config.nats_url, store):
        yield made


async def test_no_one_can_speak_for_another_user(
    auth_config: Config, auth_plane: ControlPlane, store: AuthStore, clients: dict[str, SandboxClient], sandbox: str
) -> None:
    writer = clients["writer"]
    audited = await count(auth_config.nats_url, store, subjects.AUDIT_STREAM)
    logged = await count(auth_config.nats_url, store, subjects.LOG_STREAM)
    payload = msgspec.json.encode(
        {"type": "sandboxctl.command.create.v1", "name": sandbox, "image": "x", "command_id": "c-imp", "actor": "ops"}
    )
    for subject in (subjects.command("create", ADMIN_USER), subjects.command("create")):
        Figures.attempts += 1
        with pytest.raises(PermissionDenied):  # refused by the server: the state machine never sees it
            await writer._request(subject, payload)
        assert subject.lower() in writer.denials.subjects
        Figures.refused += 1
    assert await count(auth_config.nats_url, store, subjects.AUDIT_STREAM) == audited
    assert await count(auth_config.nats_url, store, subjects.LOG_STREAM) == logged
    # A reader's push consumer may name any deliver subject (JetStream does not check it against the
    # reader's permissions), even another user's command subject: what arrives there is a log envelope,
    # never a command, so it is refused as malformed and acts for no one (docs/security.md).
    watcher = await nats.connect(
        auth_config.nats_url, **store.credentials(component_user("statemachine")).connect_options()
    )
    reader = await Raw.connect(auth_config.nats_url, store, "reader")
    assert (await writer.create(sandbox, "localhost/no-such-image:latest")).accepted  # something in the log
    audited = await count(auth_config.nats_url, store, subjects.AUDIT_STREAM)
    try:
        seen: list[bytes] = []

        async def note(msg: Any) -> None:
            seen.append(msg.data)

        await watcher.subscribe(subjects.command("stop", ADMIN_USER), cb=note)
        await watcher.flush()
        config = {"deliver_subject": subjects.command("stop", ADMIN_USER), "ack_policy": "none"}
        request = {"stream_name": subjects.LOG_STREAM, "config": {**config, "deliver_policy": "all"}}
        answer = await reader.nc.request(
            f"$JS.API.CONSUMER.CREATE.{subjects.LOG_STREAM}", json.dumps(request).encode(), timeout=2
        )
        for _ in range(50):  # the attack is made: the log's entries arrive on the admin's command subject
            if seen:
                break
            await asyncio.sleep(0.1)
        assert seen, f"nothing was delivered on the admin's command subject: no attack was made ({answer.data!r})"
        await asyncio.sleep(0.5)  # the state machine, subscribed there too, has had them
        for data in seen:
            with pytest.raises(msgspec.ValidationError):
                command_decoder.decode(data)
            reply = await auth_plane.statemachine.handle(subjects.command("stop", ADMIN_USER), data)
            assert reply.error is not None and reply.error.code == "invalid_argument"
    finally:
        await reader.nc.close()
        await watcher.close()
    assert await count(auth_config.nats_url, store, subjects.AUDIT_STREAM) == audited
    # were a command on the plain subject to reach the state machine, it would refuse it as well
    reply = await auth_plane.statemachine.handle(subjects.command("create"), payload)
    assert reply.error is not None and reply.error.code == "permission_denied", reply
    # with no credentials at all, the server does not let one in
    Figures.attempts += 1
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(auth_config.nats_url, allow_reconnect=False, connect_timeout=2)
    Figures.refused += 1


async def test_without_users_on_the_server_a_credential_changes_nothing(tmp_path: Path) -> None:
    """A leftover credential against a server with no users: the plain subjects, as before."""
    server = NatsServer(tmp_path / "nats").start()
    config = Config(nats_url=server.url, data_dir=tmp_path / "data", drivers=("podman",), default_driver="podman")
    plane = await ControlPlane(config, components=("statemachine",)).start()
    assert not plane.auth_enabled
    await announce_host(server.url, config.host)
    try:
        client = await SandboxClient.connect(server.url, actor="someone", user="leftover", password="x")
        try:
            assert client.user == ""
            reply = await client.create("plain-subjects", "localhost/whatever:latest")
            assert reply.accepted and reply.phase == "Provisioning"
        finally:
            await client.close()
    finally:
        await plane.stop()
        server.stop()


async def test_the_projectors_catch_up_reader_reads_with_the_projectors_own_permissions(
    tmp_path: Path, auth_server: NatsServer, store: AuthStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A long catch-up hands the reading to a process of its own (bus/bulkread.py); it
    connects as the projector, and what that user may do must be enough for it."""
    writer = await nats.connect(auth_server.url, **store.credentials(component_user("statemachine")).connect_options())
    try:
        await fill(writer, 500, 50)
    finally:
        await writer.close()
    nc = await nats.connect(auth_server.url, **store.credentials(component_user("projector")).connect_options())
    projector = Projector(nc, tmp_path / "projection.db", notify=True, bulk_behind=1)
    try:
        with caplog.at_level(logging.WARNING, logger="sandboxctl.services.projector"):
            await projector.start()
            await asyncio.wait_for(projector.caught_up.wait(), 60)
        assert projector.position == 500 and len(projector.rows) == 50
        assert not [r.getMessage() for r in caplog.records if "catch-up reader" in r.getMessage()]
    finally:
        await projector.stop()
        await nc.close()


async def test_projectors_write_and_take_in_their_snapshot_with_their_own_permissions_and_no_other_bucket(
    tmp_path: Path, auth_server: NatsServer, store: AuthStore
) -> None:
    """A projector's snapshot goes to the projectors' bucket, under the projectors' lease, with
    what the projector's user may do; a new projector takes it in. That user may not write the
    state machine's snapshot bucket, which the state machine trusts."""
    writer = await nats.connect(auth_server.url, **store.credentials(component_user("statemachine")).connect_options())
    try:
        await fill(writer, 300, 30)
    finally:
        await writer.close()
    options = store.credentials(component_user("projector")).connect_options()
    first = Projector(await nats.connect(auth_server.url, **options), tmp_path / "a.db", snapshot_every=100)
    second = Projector(await nats.connect(auth_server.url, **options), tmp_path / "b.db", snapshot_every=100)
    try:
        await first.start()
        await asyncio.wait_for(first.caught_up.wait(), 60)
        assert await first.snapshot_lease.hold()
        assert await first.write_snapshot() == 300
        await second.start()
        assert second.snapshot_at == 300 and len(second.rows) == 30
        # The state machine's bucket is not the projector's to make, read or write.
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.APIError)):
            await snapshots.snapshot_store(first.nc.jetstream(timeout=1))
    finally:
        for projector in (second, first):
            await projector.stop()
            await projector.nc.close()


async def test_the_state_machines_catch_up_reader_reads_with_the_state_machines_own_permissions(
    auth_server: NatsServer, store: AuthStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The state machine folds a long log at start through the same reader process; it
    connects as the state machine, whose permissions must be enough for it."""
    options = store.credentials(component_user("statemachine")).connect_options()
    writer = await nats.connect(auth_server.url, **options)
    try:
        await fill(writer, 500, 50)
    finally:
        await writer.close()
    nc = await nats.connect(auth_server.url, **options)
    service = StateMachineService(nc, authorizer=Authorizer(store), bulk_behind=1)
    try:
        with caplog.at_level(logging.WARNING, logger="sandboxctl.services.statemachine"):
            await asyncio.wait_for(service.start(), 60)
        assert service.position == 500 and len(service.states) == 50
        assert not [r.getMessage() for r in caplog.records if "catch-up reader" in r.getMessage()]
    finally:
        await service.stop()
        await nc.close()
