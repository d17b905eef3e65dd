"""The users and the tools of the authorization tests (tests/integration/test_auth.py and
tests/e2e/test_auth.py): a store with a user per role, a plain connection that records the
server's refusals, counts of a stream's messages, and the figures the suites print."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from sandboxctl.auth import READ, WRITE, AuthStore, component_user
from sandboxctl.client import Denials, SandboxClient
from sandboxctl.runtime.config import Config, default_host_name

ADMIN_USER = "ops"


class Figures:
    """What a suite tried, printed at its end (the issue asks each suite to state its figures)."""

    attempts = 0
    refused = 0

    @classmethod
    def reported(cls) -> Iterator[None]:
        """Count from zero for one module, and print what it tried once it is done."""
        cls.attempts = cls.refused = 0
        yield
        print(f"\nauthorization: {cls.attempts} forbidden attempts made, {cls.refused} refused")


def make_store(root: Path) -> AuthStore:
    """An admin, a reader, a writer and a user with no role."""
    store = AuthStore(root)
    store.provision(ADMIN_USER, default_host_name())
    store.add("reader", [READ])
    store.add("writer", [WRITE])
    store.add("nobody", [])
    return store


def auth_config(root: Path, url: str, store: AuthStore, podman_url: str = "") -> Config:
    """A plane on podman (when ``podman_url`` names its service) whose users are ``store``'s."""
    return Config(
        nats_url=url,
        data_dir=root / "data",
        run_dir=root / "run",
        podman_url=podman_url,
        drivers=("podman",),
        default_driver="podman",
        auth_dir=store.root,
    )


async def role_clients(url: str, store: AuthStore) -> AsyncIterator[dict[str, SandboxClient]]:
    """A client per user of ``make_store``, closed at the end."""
    made: dict[str, SandboxClient] = {}
    for user in (ADMIN_USER, "reader", "writer", "nobody"):
        creds = store.credentials(user)
        made[user] = await SandboxClient.connect(url, user=creds.user, password=creds.password)
    yield made
    for client in made.values():
        await client.close()


class Raw:
    """A plain nats-py connection as a user, recording every refusal the server sends it."""

    def __init__(self, nc: Any, denials: Denials, errors: list[str]) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=1.0)
        self.denials = denials
        self.errors = errors

    @classmethod
    async def connect(cls, url: str, store: AuthStore, user: str) -> Raw:
        denials, errors = Denials(), []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())
            await denials.error_cb(exc)

        nc = await nats.connect(url, error_cb=on_error, **store.credentials(user).connect_options())
        return cls(nc, denials, errors)

    async def refused(self, subject: str, attempt: Any) -> None:
        """Run ``attempt`` and assert the server refused the publish to ``subject`` (it gets no answer)."""
        Figures.attempts += 1
        refusal = self.denials.watch(subject)
        try:
            with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
                await attempt
            # the server's -ERR is asynchronous; wait for it rather than flush: a PING whose
            # connection is remade in between is never answered, and flush waits out its 10 s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(refusal), 5.0)
        finally:
            self.denials.forget(subject, refusal)
        assert refusal.done(), (subject, self.errors)  # this attempt's refusal, not an earlier one
        Figures.refused += 1


async def count(url: str, store: AuthStore, stream: str, subject: str = "") -> int:
    """Messages in a stream (on one subject), read with the state machine's own credentials (it may
    look at every stream)."""
    nc = await nats.connect(url, **store.credentials(component_user("statemachine")).connect_options())
    try:
        info = await nc.jetstream().stream_info(stream, subjects_filter=subject or None)
        return int(info.state.messages) if not subject else sum((info.state.subjects or {}).values())
    finally:
        await nc.close()
