"""The command line with no server to talk to: one line, ``unavailable``, exit 8. The lifecycle
itself, on real engines, is tests/e2e/test_lifecycle.py."""

from __future__ import annotations

from sandboxctl.runtime.config import Config
from tests.conftest import run_cli_process


async def test_cli_without_a_server_says_so(tmp_path) -> None:
    from sandboxctl.runtime.embedded import free_port

    config = Config(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=tmp_path)
    code, _, err = await run_cli_process(config, "list")
    assert code == 8 and err.startswith("sandboxctl: unavailable:") and len(err.strip().splitlines()) == 1
