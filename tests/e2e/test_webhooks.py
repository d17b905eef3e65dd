"""Webhooks against a real HTTP server on this machine: ``sandboxctl webhook add`` and a create,
a stop and a start reach it as signed CloudEvents in binary mode, in the log's order; a receiver
that fails and recovers gets every event, retried; one that never recovers has its events
dead-lettered while the others are unaffected; and a relay stopped while events happen delivers
them once it is back. Bad input is refused with a reason and nothing is added."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sandboxctl.auth import AuthStore
from sandboxctl.bus.webhooks import add_webhook, webhooks_bucket
from sandboxctl.client import PermissionDenied, SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.webhooks import SIGNATURE_HEADER, Webhook
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import COMPONENTS, ControlPlane, NatsServer
from tests.authkit import ADMIN_USER, auth_config, make_store
from tests.conftest import CLI

SECRET = "a-shared-secret-of-some-length"


class Receiver:
    """An HTTP server (the standard library's, on a thread) that records every POST; ``failing``
    answers the next so many with 500, a path in ``down`` is answered 500 while it is there."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.failing = 0
        self.down: set[str] = set()
        self.refused = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                path = self.path.lstrip("/")
                with receiver._lock:
                    refuse = receiver.failing > 0 or path in receiver.down
                    if refuse:
                        receiver.failing = max(0, receiver.failing - 1)
                        receiver.refused += 1
                    else:
                        receiver.requests.append((path, dict(self.headers.items()), body))
                self.send_response(500 if refuse else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    async def start(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.shutdown)
        self.server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def got(self, path: str, name: str) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return [(h, b) for p, h, b in self.requests if p == path and h.get("ce-subject") == name]


async def until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


def quick(config: Config) -> Config:
    return dataclasses.replace(config, webhook_attempts=3, webhook_backoff=0.05, webhook_backoff_max=0.1)


async def add(cli: CLI, tmp_path: Path, url: str, *types: str) -> str:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    code, out, err = await cli("webhook", "add", url, "--secret-file", str(secret), *(f"--type={t}" for t in types))
    assert code == 0, err
    return out.split()[1]


def verified(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    assert headers["ce-specversion"] == "1.0" and headers["Content-Type"] == "application/json"
    data: dict[str, Any] = json.loads(body)
    return data


@dataclasses.dataclass
class Relayed:
    """A plane with a relay that retries quickly, a receiver, a client and the CLI; ``plane`` is
    replaced by a test that restarts it, and whichever runs at the end is stopped."""

    config: Config
    receiver: Receiver
    plane: ControlPlane
    client: SandboxClient
    cli: CLI


@pytest.fixture
async def relayed(podman_config: Config, capsys: pytest.CaptureFixture[str]) -> AsyncIterator[Relayed]:
    config = quick(podman_config)
    async with contextlib.AsyncExitStack() as stack:  # what started is stopped, whatever failed after
        receiver = await Receiver().start()
        stack.push_async_callback(receiver.stop)
        plane = await ControlPlane(config).start()
        try:
            client = await SandboxClient.connect(config.nats_url, actor="test")
        except BaseException:
            await plane.stop()
            raise
        setup = Relayed(config, receiver, plane, client, CLI(config, capsys))
        stack.push_async_callback(lambda: setup.plane.stop())  # the plane running at the end
        stack.push_async_callback(client.close)
        yield setup


async def test_webhooks_get_signed_cloudevents_in_order_with_retries_dead_letters_and_restarts(
    relayed: Relayed, tmp_path: Path, names: Any, image: str
) -> None:
    config, receiver, client, cli = relayed.config, relayed.receiver, relayed.client, relayed.cli
    ok = await add(cli, tmp_path, receiver.url("ok"), "ready,stopped")
    broken = await add(cli, tmp_path, receiver.url("broken"), "stopped")
    receiver.down.add("broken")
    code, out, err = await cli("webhook", "list", "-o", "json")
    assert code == 0, err
    listed = {row["id"]: row for row in json.loads(out)}
    assert set(listed) == {ok, broken} and listed[ok]["types"] == "ready,stopped"
    assert SECRET not in out  # the secret is never shown

    name = names.new("hook")
    reply = await client.create(name, image)
    await client.wait_for(name, "Ready", reply.seq, timeout=60)
    reply = await client.stop(name, timeout=1)
    await client.wait_for(name, "Stopped", reply.seq, timeout=60)
    receiver.failing = 2  # the next two requests fail: the start's Ready is retried, then delivered
    reply = await client.start(name)
    await client.wait_for(name, "Ready", reply.seq, timeout=60)
    await until(lambda: len(receiver.got("ok", name)) == 3, "three events at the good receiver")
    got = receiver.got("ok", name)
    types = [h["ce-type"] for h, _ in got]
    assert types == ["sandboxctl.sandbox.ready.v1", "sandboxctl.sandbox.stopped.v1", "sandboxctl.sandbox.ready.v1"]
    sequences = [int(h["ce-sequence"]) for h, _ in got]
    assert sequences == sorted(sequences) and len(set(h["ce-id"] for h, _ in got)) == 3
    for headers, body in got:
        verified(headers, body)
        assert headers["ce-source"] and headers["ce-time"]
    assert receiver.refused >= 2

    # the broken receiver's stop is dead-lettered, naming the webhook, after its tries
    async def dead() -> list[dict[str, Any]]:
        return [d for d in await client.dead_letters() if d["consumer"] == subjects.RELAY_CONSUMER]

    deadline = time.monotonic() + 30
    while not (letters := await dead()):
        assert time.monotonic() < deadline, "the broken webhook's event was not dead-lettered"
        await asyncio.sleep(0.2)
    assert broken in letters[0]["reason"] and "HTTP 500" in letters[0]["reason"]
    assert letters[0]["deliveries"] >= 1 and name in letters[0]["subject"]

    # the relay stopped: events happen; back, it delivers them, nothing lost
    await relayed.plane.stop()
    others = tuple(c for c in COMPONENTS if c != "webhooks")
    relayed.plane = await ControlPlane(config, components=others).start()
    reply = await client.stop(name, timeout=1)
    await client.wait_for(name, "Stopped", reply.seq, timeout=60)
    await asyncio.sleep(0.5)
    assert len(receiver.got("ok", name)) == 3  # no relay runs: nothing is sent
    relay = await ControlPlane(config, components=("webhooks",)).start()
    try:
        await until(lambda: len(receiver.got("ok", name)) == 4, "the stop made while no relay ran")
        assert receiver.got("ok", name)[-1][0]["ce-type"] == "sandboxctl.sandbox.stopped.v1"
    finally:
        await relay.stop()

    code, _, err = await cli("webhook", "remove", broken)
    assert code == 0, err
    code, out, _ = await cli("webhook", "list", "-o", "json")
    assert [row["id"] for row in json.loads(out)] == [ok]


async def test_a_webhook_gets_the_events_after_it_was_added_not_before(
    relayed: Relayed, tmp_path: Path, names: Any, image: str
) -> None:
    receiver, client, cli = relayed.receiver, relayed.client, relayed.cli
    name = names.new("late")
    reply = await client.create(name, image)
    await client.wait_for(name, "Ready", reply.seq, timeout=60)
    await add(cli, tmp_path, receiver.url("late"))
    reply = await client.stop(name, timeout=1)
    await client.wait_for(name, "Stopped", reply.seq, timeout=60)
    await until(lambda: len(receiver.got("late", name)) == 2, "the stop's two events")
    assert [h["ce-type"] for h, _ in receiver.got("late", name)] == [
        "sandboxctl.sandbox.stop_requested.v1",
        "sandboxctl.sandbox.stopped.v1",
    ]


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["webhook", "add", "ftp://example.com/x"], "must be http:// or https://"),
        (["webhook", "add", "http://user:pw@example.com/x"], "must not carry credentials"),
        (["webhook", "add", "http://example.com/x", "--type", "frobnicated"], "no event type matches"),
        (["webhook", "remove", "not-hex"], "12 hexadecimal digits"),
        (["webhook", "remove", "0123456789ab"], "no webhook 0123456789ab"),
    ],
)
async def test_bad_webhook_input_is_refused_with_a_reason(
    nats_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    plane = await ControlPlane(nats_config, components=("statemachine", "projector", "query")).start()
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    try:
        cli = CLI(nats_config, capsys)
        extra = ["--secret-file", str(secret)] if argv[1] == "add" else []
        code, _, err = await cli(*argv, *extra)
        assert code != 0 and reason in err, err
        secret.write_text("short")
        code, _, err = await cli("webhook", "add", "http://example.com/x", "--secret-file", str(secret))
        assert code == 2 and "the secret must be" in err, err
        code, out, err = await cli("webhook", "list", "-o", "json")
        assert code == 0 and json.loads(out) == [], err
    finally:
        await plane.stop()


async def test_a_webhook_the_relay_sees_after_passing_its_position_is_caught_up_from_the_log(
    relayed: Relayed, tmp_path: Path, names: Any, image: str
) -> None:
    """The relay may read past the position a webhook was added at before its watch brings the
    webhook (a moment's race): before the next event, it delivers the ones it passed, in order,
    each once. Here the webhook is written as added at log seq 0 once the relay is well past it."""
    receiver, client = relayed.receiver, relayed.client
    hook = Webhook(id="0123456789ab", url=receiver.url("caught"), secret=SECRET)
    await add(relayed.cli, tmp_path, receiver.url("first"))  # the relay's consumer runs
    name = names.new("caught")
    reply = await client.create(name, image)
    await client.wait_for(name, "Ready", reply.seq, timeout=60)
    await until(lambda: receiver.got("first", name), "the create at the first webhook")
    await add_webhook(await webhooks_bucket(client.nc.jetstream()), hook)
    await asyncio.sleep(0.5)  # the relay sees it now, and catches it up at the next event
    reply = await client.stop(name, timeout=1)
    await client.wait_for(name, "Stopped", reply.seq, timeout=60)
    stopped = "sandboxctl.sandbox.stopped.v1"
    for path in ("first", "caught"):
        await until(lambda p=path: [h for h, _ in receiver.got(p, name) if h["ce-type"] == stopped], path)
    got = receiver.got("caught", name)
    sequences = [int(h["ce-sequence"]) for h, _ in got]
    assert sequences == sorted(set(sequences)), sequences  # in order, each once
    assert [h["ce-type"] for h, _ in got] == [h["ce-type"] for h, _ in receiver.got("first", name)]
    assert got[0][0]["ce-type"] == "sandboxctl.sandbox.created.v1"
    assert got[-1][0]["ce-type"] == "sandboxctl.sandbox.stopped.v1"


@pytest.fixture
def store(tmp_path: Path) -> AuthStore:
    return make_store(tmp_path / "auth")


async def test_with_authentication_only_an_admin_manages_webhooks_and_the_relay_works_as_its_own_user(
    tmp_path: Path, auth_server: NatsServer, store: AuthStore, podman_url: str, names: Any, image: str
) -> None:
    config = quick(auth_config(tmp_path, auth_server.url, store, podman_url))
    receiver = await Receiver().start()
    plane = await ControlPlane(config).start()
    clients = {
        user: await SandboxClient.connect(config.nats_url, user=c.user, password=c.password)
        for user in (ADMIN_USER, "writer", "reader")
        for c in (store.credentials(user),)
    }
    try:
        assert plane.auth_enabled
        for user in ("writer", "reader"):
            began = time.monotonic()
            with pytest.raises(PermissionDenied):
                await clients[user].add_webhook(receiver.url("auth"), [], SECRET)
            with pytest.raises(PermissionDenied):
                await clients[user].webhooks()  # the secrets are in the bucket: no one else reads it
            assert time.monotonic() - began < 4.0  # refused at once, not left to time out
        row = await clients[ADMIN_USER].add_webhook(receiver.url("auth"), ["stopped"], SECRET)
        assert [r["id"] for r in await clients[ADMIN_USER].webhooks()] == [row["id"]]
        writer = clients["writer"]
        name = names.new("authhook")
        reply = await writer.create(name, image)
        await writer.wait_for(name, "Ready", reply.seq, timeout=60)
        reply = await writer.stop(name, timeout=1)
        await writer.wait_for(name, "Stopped", reply.seq, timeout=60)
        await until(lambda: len(receiver.got("auth", name)) == 1, "the stop, relayed under the relay's own user")
        verified(*receiver.got("auth", name)[0])
    finally:
        for client in clients.values():
            await client.close()
        await plane.stop()
        await receiver.stop()
