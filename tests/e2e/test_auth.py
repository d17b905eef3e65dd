"""Authorization against a real nats-server that admits only its users, with the permissions
sandboxctl.auth generates, and the real services and podman behind it: who may do what is checked
by the server and by the state machine, never by a fake. What needs no engine (impersonation, the
catch-up readers' permissions, a server without users) is tests/integration/test_auth.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.js.api import ConsumerConfig, StreamConfig

from sandboxctl.auth import READ, WRITE, AuthStore, component_user
from sandboxctl.client import PermissionDenied, SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer, free_port
from tests.authkit import ADMIN_USER, Figures, Raw, count, make_store, role_clients
from tests.authkit import auth_config as auth_config_for
from tests.conftest import CLI, ROOT, cli_process, podman


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield from Figures.reported()


@pytest.fixture
def store(tmp_path: Path) -> AuthStore:
    return make_store(tmp_path / "auth")


@pytest.fixture
def auth_config(tmp_path: Path, auth_server: NatsServer, store: AuthStore, podman_url: str) -> Config:
    return auth_config_for(tmp_path, auth_server.url, store, podman_url)


@pytest.fixture
async def auth_plane(auth_config: Config) -> AsyncIterator[ControlPlane]:
    plane = await ControlPlane(auth_config).start()
    assert plane.auth_enabled
    yield plane
    await plane.stop()


@pytest.fixture
def sandbox() -> Iterator[str]:
    name = f"auth-{uuid.uuid4().hex[:8]}"
    yield name
    podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
    podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


@pytest.fixture
async def clients(
    auth_config: Config, auth_plane: ControlPlane, store: AuthStore
) -> AsyncIterator[dict[str, SandboxClient]]:
    async for made in role_clients(auth_config.nats_url, store):
        yield made


async def test_a_readers_stop_is_refused_recorded_for_auditors_and_never_logged(
    auth_config: Config, store: AuthStore, clients: dict[str, SandboxClient], sandbox: str, image: str
) -> None:
    writer, reader, admin = clients["writer"], clients["reader"], clients[ADMIN_USER]
    created = await writer.create(sandbox, image)
    await writer.wait_for(sandbox, "Ready", created.seq)
    logged = await count(auth_config.nats_url, store, subjects.LOG_STREAM)

    # the reader claims to be the writer in the payload; the subject says who it is
    payload = msgspec.json.encode(
        {"type": "sandboxctl.command.stop.v1", "name": sandbox, "command_id": "c-reader-1", "actor": "writer"}
    )
    Figures.attempts += 1
    reply = await reader._request(subjects.command("stop", "reader"), payload)
    assert reply.error is not None and reply.error.code == "permission_denied"
    assert "needs sandbox:write" in reply.error.message and "reader" in reply.error.message
    Figures.refused += 1
    with pytest.raises(PermissionDenied):  # the typed error, through the client's own method
        await reader.stop(sandbox)

    assert await count(auth_config.nats_url, store, subjects.LOG_STREAM) == logged
    assert (await reader.get(sandbox))["phase"] == "Ready"  # a reader may read
    denied = await admin.denied_attempts()
    first = next(d for d in denied if d["command_id"] == "c-reader-1")
    assert first["user"] == "reader" and first["action"] == "stop" and first["sandbox"] == sandbox
    assert first["required"] == WRITE and first["roles"] == [READ] and first["claimed_actor"] == "writer"
    assert first["subject"] == "sandboxctl.cmd.stop.reader" and first["time"] and first["reason"]
    assert len(denied) == 2  # and the second stop too


async def test_a_writer_creates_stops_starts_and_deletes_on_podman_as_itself(
    auth_config: Config, clients: dict[str, SandboxClient], sandbox: str, image: str
) -> None:
    writer = clients["writer"]
    # a payload that claims another actor: the event's actor is still the authenticated user
    payload = msgspec.json.encode(
        {"type": "sandboxctl.command.create.v1", "name": sandbox, "image": image, "command_id": "c-w", "actor": "ops"}
    )
    reply = await writer._request(subjects.command("create", "writer"), payload)
    assert reply.accepted, reply
    await writer.wait_for(sandbox, "Ready", reply.seq)
    assert podman("container", "inspect", "-f", "{{.State.Running}}", f"sandboxctl-{sandbox}").stdout.strip() == "true"
    await writer.wait_for(sandbox, "Stopped", (await writer.stop(sandbox, timeout=2)).seq)
    assert podman("container", "inspect", "-f", "{{.State.Running}}", f"sandboxctl-{sandbox}").stdout.strip() == "false"
    await writer.wait_for(sandbox, "Ready", (await writer.start(sandbox)).seq)
    await writer.wait_for(sandbox, "Deleted", (await writer.delete(sandbox)).seq)
    assert podman("container", "exists", f"sandboxctl-{sandbox}", check=False).returncode != 0
    history = await writer.history(sandbox)
    commanded = [h for h in history if h["type"].split(".")[2] in ("created", "stop_requested", "start_requested")]
    assert commanded and {h["actor"] for h in commanded} == {"writer"}


async def test_a_client_cannot_publish_facts_write_the_log_or_manage_streams(
    auth_config: Config, auth_plane: ControlPlane, store: AuthStore
) -> None:
    url = auth_config.nats_url
    logged = await count(url, store, subjects.LOG_STREAM)
    fact = b'{"id":"f","type":"sandboxctl.fact.container_removed.v1","source":"x","subject":"victim",'
    for user in ("writer", ADMIN_USER):  # not even an admin
        raw = await Raw.connect(url, store, user)
        try:
            await raw.refused(subjects.fact("victim"), raw.js.publish(subjects.fact("victim"), fact))
            await raw.refused(subjects.log("victim"), raw.js.publish(subjects.log("victim"), b"{}"))
            await raw.refused(
                "$JS.API.STREAM.CREATE.EVIL", raw.js.add_stream(StreamConfig(name="EVIL", subjects=["evil.>"]))
            )
            for verb in ("DELETE", "PURGE", "UPDATE"):
                subject = f"$JS.API.STREAM.{verb}.{subjects.LOG_STREAM}"
                await raw.refused(subject, raw.nc.request(subject, b"{}", timeout=1))
            worker = "sandboxctl-driver-podman"
            await raw.refused(
                f"$JS.API.CONSUMER.DELETE.{subjects.LOG_STREAM}.{worker}",
                raw.js.delete_consumer(subjects.LOG_STREAM, worker),
            )
            await raw.refused(  # nor steal the worker's work orders
                f"$JS.API.CONSUMER.MSG.NEXT.{subjects.LOG_STREAM}.{worker}",
                raw.nc.request(f"$JS.API.CONSUMER.MSG.NEXT.{subjects.LOG_STREAM}.{worker}", b"1", timeout=1),
            )
            # the one consumer call a reader has creates ephemeral consumers only: no taking over a durable
            hijack = {"stream_name": subjects.LOG_STREAM, "config": {"durable_name": worker, "ack_policy": "none"}}
            answer = await raw.nc.request(
                f"$JS.API.CONSUMER.CREATE.{subjects.LOG_STREAM}", json.dumps(hijack).encode(), timeout=2
            )
            assert "error" in json.loads(answer.data), answer.data
        finally:
            await raw.nc.close()
    # the worker reports what it finds on the shared engine, so count the victim's facts only
    assert await count(url, store, subjects.FACTS_STREAM, subjects.fact("victim")) == 0
    assert await count(url, store, subjects.LOG_STREAM) == logged  # and both streams are still there


async def test_a_user_without_read_cannot_read_the_log_or_anyones_replies(
    auth_config: Config, store: AuthStore, clients: dict[str, SandboxClient]
) -> None:
    nobody = clients["nobody"]
    Figures.attempts += 3
    with pytest.raises(PermissionDenied):
        async for _ in nobody.events(follow=False):
            pass
    with pytest.raises(PermissionDenied):
        await nobody.list()
    with pytest.raises(PermissionDenied):
        await nobody.dead_letters()
    Figures.refused += 3
    raw = await Raw.connect(auth_config.nats_url, store, "nobody")
    try:
        await raw.refused(
            f"$JS.API.CONSUMER.CREATE.{subjects.LOG_STREAM}",
            raw.js.add_consumer(subjects.LOG_STREAM, ConsumerConfig(deliver_subject="_INBOX.nobody.x")),
        )
        await raw.refused(
            f"$JS.API.STREAM.MSG.GET.{subjects.LOG_STREAM}",
            raw.js.get_last_msg(subjects.LOG_STREAM, subjects.log("x")),
        )
        # nor listen where others' replies and log deliveries go, nor to commands or projection notices
        for subject in ("_INBOX.>", "_INBOX.reader.>", subjects.COMMANDS_ALL, subjects.log("x"), "sandboxctl.>"):
            Figures.attempts += 1
            await raw.nc.subscribe(subject)
            await raw.nc.flush()
            await asyncio.sleep(0.05)
            assert any(f'subscription to "{subject.lower()}"' in e for e in raw.errors), (subject, raw.errors)
            Figures.refused += 1
    finally:
        await raw.nc.close()


async def test_no_one_can_make_a_service_answer_into_the_log(
    auth_config: Config, auth_plane: ControlPlane, store: AuthStore, sandbox: str
) -> None:
    """A request names its own reply subject, and the state machine may write the log: a reply
    subject that is not the sender's own inbox gets no answer (and the command no decision), or
    anyone could store the state machine's answer as a log entry."""
    logged = await count(auth_config.nats_url, store, subjects.LOG_STREAM)
    nobody = await Raw.connect(auth_config.nats_url, store, "nobody")
    writer = await Raw.connect(auth_config.nats_url, store, "writer")
    try:
        for raw, user in ((nobody, "nobody"), (writer, "writer")):
            payload = msgspec.json.encode(
                {"type": "sandboxctl.command.create.v1", "name": sandbox, "image": "x", "command_id": f"inj-{user}"}
            )
            for reply in (subjects.log(sandbox), subjects.log("injected"), f"{subjects.inbox_prefix('ops')}.x"):
                Figures.attempts += 1
                await raw.nc.publish(subjects.command("create", user), payload, reply=reply)
                await raw.nc.flush()
                Figures.refused += 1
        await asyncio.sleep(1)
    finally:
        await nobody.nc.close()
        await writer.nc.close()
    assert await count(auth_config.nats_url, store, subjects.LOG_STREAM) == logged


async def test_the_cli_says_permission_denied_and_only_an_admin_runs_verify(
    auth_config: Config,
    auth_plane: ControlPlane,
    store: AuthStore,
    capsys: pytest.CaptureFixture[str],
    sandbox: str,
    image: str,
) -> None:
    def as_user(user: str) -> CLI:
        creds = store.credentials(user)
        return CLI(dataclasses.replace(auth_config, user=creds.user, password=creds.password), capsys)

    admin, reader = as_user(ADMIN_USER), as_user("reader")
    code, out, err = await admin("create", sandbox, "--image", image)
    assert code == 0, err
    for argv in (("stop", sandbox), ("delete", sandbox), ("create", "other", "--image", image)):
        Figures.attempts += 1
        code, out, err = await reader(*argv)
        assert code == 11 and err.startswith("sandboxctl: permission_denied: "), (argv, code, err)
        assert len(err.strip().splitlines()) == 1, err
        Figures.refused += 1
    code, out, err = await reader("get", sandbox, "-o", "json")
    assert code == 0 and json.loads(out)["phase"] == "Ready", err
    for what in ("verify", "replay", "denied"):
        Figures.attempts += 1
        code, out, err = await reader("audit", what)
        assert code == 11 and err == f"sandboxctl: permission_denied: audit {what} needs the admin role; " \
            "user reader does not have it\n", err  # fmt: skip
        Figures.refused += 1
    code, out, err = await admin("audit", "verify")
    assert code == 0 and "no violations" in out, err
    code, out, err = await admin("audit", "denied", "-o", "json")
    assert code == 0 and {d["action"] for d in json.loads(out)} == {"stop", "delete", "create"}, err
    code, out, err = await admin("delete", sandbox)
    assert code == 0, err

    # as a user runs it: the credential comes from a file named in the environment
    env = {**os.environ, "SANDBOXCTL_NATS_URL": auth_config.nats_url, "SANDBOXCTL_DATA_DIR": str(auth_config.data_dir)}
    env["SANDBOXCTL_CREDENTIALS"] = str(store.credentials_path("nobody"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "list", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err_bytes = await proc.communicate()
    assert proc.returncode == 11, err_bytes
    assert err_bytes.decode().startswith("sandboxctl: permission_denied: user nobody may not publish to")


async def test_up_makes_the_credentials_and_user_add_admits_a_new_user(
    tmp_path: Path, podman_url: str, image: str, sandbox: str
) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {
        **os.environ,
        "USER": "local-op",
        "SANDBOXCTL_DATA_DIR": str(data),
        "SANDBOXCTL_RUN_DIR": str(tmp_path / "run"),
        "SANDBOXCTL_PODMAN_URL": podman_url,
        "SANDBOXCTL_DRIVERS": "podman",
        "SANDBOXCTL_NATS_URL": f"nats://127.0.0.1:{port}",
    }
    for key in ("SANDBOXCTL_CREDENTIALS", "SANDBOXCTL_USER", "SANDBOXCTL_PASSWORD"):
        env.pop(key, None)
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "up", "--port", str(port), env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        banner = b""
        async with asyncio.timeout(60):  # its log lines (an orphan container reported, ...) may come first
            while b"sandboxctl is up" not in banner:
                line = await up.stdout.readline()
                assert line, banner
                banner += line
        auth = data / "auth"
        made = sorted(p.name for p in (auth / "credentials").iterdir())
        components = (
            "statemachine",
            "projector",
            "query",
            "reaper",
            "webhooks",
            "console",
            "driver-podman",
            "driver-docker",
            "driver-vm",
        )
        assert made == sorted(["local-op.json", *(f"{component_user(c)}.json" for c in components)])
        for path in [*(auth / "credentials").iterdir(), auth / "users.json", auth / "server.conf"]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        # the README's commands, with no step of their own: the local user is the admin
        code, _, err = await cli_process(env, "create", sandbox, "--image", image)
        assert code == 0, err
        code, out, err = await cli_process(env, "history", sandbox, "-o", "json")
        assert code == 0 and {h["actor"] for h in json.loads(out) if h["type"].endswith("created.v1")} == {"local-op"}
        code, out, err = await cli_process(env, "user", "add", "bob", "--role", "sandbox:read")
        assert code == 0 and "SANDBOXCTL_CREDENTIALS=" in out, err
        bob = {**env, "SANDBOXCTL_CREDENTIALS": str(auth / "credentials" / "bob.json")}
        for _ in range(50):  # the server reloads its users on the signal, a moment later
            code, out, err = await cli_process(bob, "list", "-o", "json")
            if code == 0:
                break
            await asyncio.sleep(0.1)
        assert code == 0 and [s["name"] for s in json.loads(out)] == [sandbox], err
        code, _, err = await cli_process(bob, "stop", sandbox)
        assert code == 11 and "permission_denied" in err, err
        code, _, err = await cli_process(env, "delete", sandbox)
        assert code == 0, err
        code, _, err = await cli_process(env, "user", "add", "sandboxctl-evil", "--role", "admin")
        assert code == 2 and "reserved" in err, err
        up.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(up.communicate(), 30)
        assert up.returncode == 0, rest.decode()
        assert b"Traceback" not in rest, rest.decode()
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()


async def test_services_started_before_the_state_machine_wait_for_its_streams(
    auth_config: Config, store: AuthStore, sandbox: str, image: str
) -> None:
    """Only the state machine may create streams; ``serve --only worker`` or ``--only projector``
    started first must wait for them, not fail."""
    early = ControlPlane(auth_config, components=("projector", "query", "worker"))
    starting = asyncio.create_task(early.start())
    await asyncio.sleep(1.5)
    assert not starting.done(), "started without the streams"
    late = await ControlPlane(auth_config, components=("statemachine",)).start()
    try:
        await asyncio.wait_for(starting, 30)
        creds = store.credentials("writer")
        client = await SandboxClient.connect(auth_config.nats_url, user=creds.user, password=creds.password)
        try:
            await client.create(sandbox, image)
            await client.wait_for(sandbox, "Ready", timeout=60)
        finally:
            await client.close()
    finally:
        await early.stop()
        await late.stop()


async def test_a_writer_archives_and_restores_with_the_workers_own_permissions(
    clients: dict[str, SandboxClient], sandbox: str, image: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The driver worker's user may use the archived workspaces' bucket, and nothing more is needed
    (its check of the stored chunks and its purge of unfinished archives' included)."""
    caplog.set_level(logging.INFO, logger="sandboxctl.services.worker")
    writer = clients["writer"]
    reply = await writer.create(sandbox, image)
    await writer.wait_for(sandbox, "Ready", reply.seq)
    podman("exec", f"sandboxctl-{sandbox}", "sh", "-c", "echo kept > /workspace/f")
    reply = await writer.stop(sandbox, timeout=0)
    await writer.wait_for(sandbox, "Stopped", reply.seq)
    reply = await writer.archive(sandbox)
    await writer.wait_for(sandbox, "Archived", reply.seq, timeout=60)
    reply = await writer.start(sandbox)
    await writer.wait_for(sandbox, "Ready", reply.seq, timeout=60)
    assert podman("exec", f"sandboxctl-{sandbox}", "cat", "/workspace/f").stdout == "kept\n"
    worker = [r.getMessage() for r in caplog.records if r.name == "sandboxctl.services.worker"]
    assert not [m for m in worker if "not purged" in m or "failed" in m], worker
