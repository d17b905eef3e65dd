"""The web console on a NATS without users (``serve`` against a server someone else runs with
none): no sign-in, each browser a session of its own on one shared connection, the table's
stream starting with a snapshot, and POSTs still needing the session's token."""

from __future__ import annotations

import dataclasses
import re
import socket

import httpx
import pytest

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
        async with httpx.AsyncClient(base_url=plane.console_url) as web:
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
