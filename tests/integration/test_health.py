"""Health against a real nats-server with no sandboxctl process on it: ``status`` says
``unavailable`` (exit 8). Health and position of running services is tests/e2e/test_health.py."""

from __future__ import annotations

import pytest

from sandboxctl.cli.status import status
from sandboxctl.client import SandboxClient
from sandboxctl.runtime.embedded import NatsServer


async def test_without_any_process_status_says_unavailable(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await SandboxClient.connect(nats_server.url, actor="test")
    try:
        code = await status(client, "table", wait=0.3)
    finally:
        await client.close()
    err = capsys.readouterr().err
    assert code == 8 and err.startswith("sandboxctl: unavailable: no sandboxctl process answered"), err
