"""The published contract in use: a service with nothing but nats-py and the AsyncAPI document
(docs/examples/plain_nats_client.py) drives sandboxctl on a real engine. The document itself is
checked in tests/unit/test_contract_doc.py."""

from __future__ import annotations

import asyncio
import os
import sys

from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from tests.conftest import ROOT


async def test_a_plain_nats_service_drives_sandboxctl_from_the_docs_example(
    config: Config, plane: ControlPlane, names, image: str
) -> None:
    name = names.new("plain")
    names.new("plain-broken")  # so the fixture cleans it up too
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "docs" / "examples" / "plain_nats_client.py"), config.nats_url, name, image,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",  # no sandboxctl on the path
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[:4] == ["create Provisioning 1", "ready Ready", "stop Stopping Stopped", "start Starting Ready"]
    codes = {" ".join(line.split(" - ")[0].split()[1:-1]): line.split(" - ")[0].split()[-1] for line in lines[4:]}
    assert codes == {
        "empty name": "invalid_argument",
        "unknown driver": "invalid_argument",
        "unknown sandbox": "not_found",
        "existing name": "already_exists",
        "not allowed now": "failed_precondition",
        "malformed": "invalid_argument",
    }
