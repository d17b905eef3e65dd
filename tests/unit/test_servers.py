"""SANDBOXCTL_NATS_URL: one server's URL or a cluster's, comma-separated, each checked."""

from __future__ import annotations

import pytest

from sandboxctl.bus.servers import server_urls


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no NATS server URL given"),
        ("nats://a:1, ,nats://b:2", ""),
        ("http://a:1", "is not of the form nats://HOST:PORT"),
        ("nats://a:0", "is not of the form"),
        ("nats://:4222", "is not of the form"),
    ],
)
def test_server_urls_are_checked_one_by_one(text: str, problem: str) -> None:
    if not problem:
        assert server_urls(text) == ["nats://a:1", "nats://b:2"]
        return
    with pytest.raises(ValueError, match=problem):
        server_urls(text)
