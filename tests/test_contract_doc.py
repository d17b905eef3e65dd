"""The published contract: the AsyncAPI document is current and valid, and a
service with nothing but nats-py and that document can drive sandboxctl."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest

from sandboxctl.events.asyncapi import DOCUMENT, render
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from tests.conftest import ROOT

ASYNCAPI_SCHEMA = Path(
    os.environ.get(
        "SANDBOXCTL_ASYNCAPI_SCHEMA", ROOT / ".cache/asyncapi/node_modules/@asyncapi/specs/schemas/3.0.0.json"
    )
)


def test_the_committed_document_is_what_the_types_generate() -> None:
    assert DOCUMENT.read_text() == render(), "docs/asyncapi.json is stale: run python -m sandboxctl.events.asyncapi"


@pytest.fixture(scope="module")
def asyncapi_validator() -> jsonschema.protocols.Validator:
    # Installed by scripts/test.sh from the npm registry (@asyncapi/specs); never vendored.
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_the_document_validates_against_the_asyncapi_3_schema(asyncapi_validator) -> None:
    document = json.loads(DOCUMENT.read_text())
    assert document["asyncapi"] == "3.0.0"
    assert [e.message for e in asyncapi_validator.iter_errors(document)] == []
    # and the validator does look inside: a broken operation and a broken schema are caught
    broken = copy.deepcopy(document)
    broken["operations"]["stopSandbox"]["action"] = "shout"
    broken["components"]["schemas"]["StopSandbox"]["type"] = 5
    assert len(list(asyncapi_validator.iter_errors(broken))) >= 2


def test_every_message_schema_accepts_a_real_payload() -> None:
    document = json.loads(DOCUMENT.read_text())

    def check(name: str, payload: dict) -> None:
        jsonschema.validate(payload, {**document["components"]["schemas"][name], "components": document["components"]})

    check("CreateSandbox", {"type": "sandboxctl.command.create.v1", "name": "a", "image": "i", "command_id": "c"})
    with pytest.raises(jsonschema.ValidationError):
        check("CreateSandbox", {"type": "sandboxctl.command.create.v1", "name": "a", "command_id": "c"})
    check("Reply", {"accepted": False, "error": {"code": "not_found", "message": "m"}})
    check(
        "SandboxFailedEnvelope",
        {
            "id": "e", "type": "sandboxctl.sandbox.failed.v2", "source": "s", "subject": "a",
            "time": "2026-01-01T00:00:00Z", "data": {"kind": "exited", "reason": "r"},
        },
    )  # fmt: skip


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
