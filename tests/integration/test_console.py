"""The web console on a NATS without users (``serve`` against a server someone else runs with
none): no sign-in, each browser a session of its own on one shared connection, the table's
stream starting with a snapshot, and POSTs still needing the session's token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sandboxctl.cli import console as console_module
from sandboxctl.cli.console import Console
from sandboxctl.client import Unavailable
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane

PARTS = ("statemachine", "projector", "query", "console")


async def test_without_users_there_is_no_sign_in_and_the_table_streams_from_the_log(nats_config: Config) -> None:
    config = dataclasses.replace(nats_config, console="127.0.0.1:0")
    plane = await ControlPlane(config, components=PARTS, console=Console).start()
    try:
        assert plane.console_url.startswith("http://127.0.0.1:")
        origin = {"Origin": plane.console_url.rstrip("/")}
        async with httpx.AsyncClient(base_url=plane.console_url, headers=origin) as web:
            page = await web.get("/")
            assert page.status_code == 200 and "Sign out" not in page.text
            assert "httponly" in page.headers["set-cookie"].lower()
            assert "samesite=strict" in page.headers["set-cookie"].lower()
            assert (await web.get("/login")).headers["location"] == "/"
            token = re.search(r'data-csrf="([^"]+)"', page.text)
            assert token is not None and 'data-may-write="1"' in page.text
            async with web.stream("GET", "/stream/sandboxes") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                assert await anext(lines) == "event: snapshot"
                assert '"rows": []' in await anext(lines)
            refused = await web.post("/sandboxes/nope/stop")  # no token
            assert refused.status_code == 403
            answer = await web.post("/sandboxes/nope/stop", headers={"X-CSRF-Token": token.group(1)})
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
        async with httpx.AsyncClient(base_url=plane.console_url) as other:
            await other.get("/")
        console = plane.supervisor.service("console")
        assert len(console.sessions) == 2 and len({s.client for s in console.sessions.values()}) == 1
    finally:
        await plane.stop()


async def test_an_address_in_use_is_refused_in_one_line_before_any_service_starts(nats_config: Config) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = dataclasses.replace(nats_config, console=f"127.0.0.1:{port}")
        plane = ControlPlane(config, components=PARTS, console=Console)
        with pytest.raises(Unavailable, match=rf"cannot serve the console on 127.0.0.1:{port} .*SANDBOXCTL_CONSOLE"):
            await plane.start()
        assert plane.supervisor.slots == []


@contextlib.asynccontextmanager
async def console_without_users(nats_config: Config, setting: str = "127.0.0.1:0") -> AsyncIterator[Any]:
    config = dataclasses.replace(nats_config, console=setting)
    plane = await ControlPlane(config, components=PARTS, console=Console).start()
    try:
        yield plane
    finally:
        await plane.stop()


async def signed(web: httpx.AsyncClient) -> str:
    """A session for this client (no users: the first page opens one); its token."""
    page = await web.get("/")
    token = re.search(r'data-csrf="([^"]+)"', page.text)
    assert page.status_code == 200 and token is not None, page.text
    return token.group(1)


async def test_a_host_that_may_be_another_sites_domain_and_a_post_that_names_no_origin_are_refused(
    nats_config: Config,
) -> None:
    async with console_without_users(nats_config) as plane:
        url = plane.console_url.rstrip("/")
        port = url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=url) as web:
            # DNS rebinding: a site's own name pointed at 127.0.0.1, its pages then same-origin
            rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
            assert (await web.get("/", headers=rebound)).status_code == 400
            assert (await web.post("/sandboxes/x/stop", headers=rebound)).status_code == 400
            assert (await web.get("/", headers={"Host": f"localhost:{port}"})).status_code == 200
            assert (await web.get("/", headers={"Host": "[::1"})).status_code == 400  # no host at all: no error
            token = await signed(web)
            no_origin = await web.post("/sandboxes/nope/stop", headers={"X-CSRF-Token": token})
            assert no_origin.status_code == 403
            odd = await web.post(
                "/sandboxes/nope/stop", headers={"X-CSRF-Token": "é".encode("latin-1") * 10, "Origin": url}
            )
            assert odd.status_code == 403  # any text is a wrong token, never a server error
            mine = await web.post("/sandboxes/nope/stop", headers={"X-CSRF-Token": token, "Origin": url})
            assert mine.status_code == 404 and mine.json()["error"]["code"] == "not_found"


async def test_names_that_are_none_are_refused_and_streams_are_bounded_and_end_with_their_session(
    nats_config: Config,
) -> None:
    async with console_without_users(nats_config) as plane:
        url = plane.console_url.rstrip("/")
        async with httpx.AsyncClient(base_url=url, headers={"Origin": url}, timeout=10) as web:
            token = await signed(web)
            for path in ("/stream/events?sandbox=a%20b", "/stream/sandboxes?sandbox=a.>", "/sandboxes/a%20b"):
                answer = await web.get(path)
                assert answer.status_code == 400, (path, answer.text)
            bad = await web.post("/sandboxes/a%20b/stop", headers={"X-CSRF-Token": token})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_argument"

            async with contextlib.AsyncExitStack() as streams:
                opened = []
                for _ in range(console_module.STREAMS_PER_SESSION):
                    stream = await streams.enter_async_context(web.stream("GET", "/stream/events"))
                    assert stream.status_code == 200
                    opened.append(stream.aiter_lines())
                assert await anext(opened[0]) == "event: following"
                more = await web.get("/stream/events")
                assert more.status_code == 429 and more.json()["error"]["code"] == "resource_exhausted"

                # Sign-out ends the session's streams, not only its page.
                assert (await web.post("/logout", data={"csrf": token})).status_code == 303

                async def drained() -> None:
                    async for _ in opened[0]:
                        pass

                await asyncio.wait_for(drained(), 15)
            console = plane.supervisor.service("console")
            assert console.sessions == {}


async def test_a_console_without_users_is_not_served_beyond_loopback(nats_config: Config) -> None:
    config = dataclasses.replace(nats_config, console="0.0.0.0:0")
    plane = ControlPlane(config, components=PARTS, console=Console)
    try:
        with pytest.raises(Exception, match=r"without sign-in .* not loopback"):
            await plane.start()
    finally:
        await plane.stop()
