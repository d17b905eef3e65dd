"""Schema evolution: an event written as v1 is read as the current version by every reader."""

from __future__ import annotations

import json

from sandboxctl.bus import reading
from sandboxctl.bus.eventlog import decode_event
from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events import subjects
from sandboxctl.events.lifecycle import SandboxFailed
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from tests.conftest import CLI


async def test_a_v1_failure_in_the_log_is_read_as_v2_everywhere(
    config: Config, plane: ControlPlane, cli: CLI, client: SandboxClient, names, image: str
) -> None:
    name = names.new()
    await client.create(name, image)
    ready = await client.wait_for(name, "Ready")
    js = plane.statemachine.js
    # Exactly what an older sandboxctl wrote: no "kind", type ...failed.v1.
    v1 = {
        "id": f"old-writer-{name}",
        "type": "sandboxctl.sandbox.failed.v1",
        "source": "sandboxctl/statemachine",
        "subject": name,
        "time": "2026-01-01T00:00:00Z",
        "actor": "old",
        "data": {"reason": "container exited with code 3", "exit_code": 3},
    }
    ack = await js.publish(
        subjects.log(name),
        json.dumps(v1).encode(),
        headers={"Nats-Expected-Last-Subject-Sequence": str(ready["last_seq"]), "Nats-Msg-Id": v1["id"]},
    )
    # the decoder
    msg = await js.get_msg(subjects.LOG_STREAM, ack.seq)
    decoded = decode_event(msg.data)
    assert decoded.type == "sandboxctl.sandbox.failed.v2" and isinstance(decoded.data, SandboxFailed)
    assert decoded.data.kind == "exited" and decoded.data.exit_code == 3
    # the projector and the query service
    try:
        await client.wait_for(name, "Error", ack.seq, timeout=5)
    except SandboxError as exc:  # wait_for reports landing in Error as a failure of the wait
        assert exc.code == "failed" and "container exited with code 3" in exc.message
    item = await client.get(name)
    assert item["phase"] == "Error" and item["last_error"] == "container exited with code 3"
    history = await client.history(name)
    assert history[-1]["type"] == "sandboxctl.sandbox.failed.v2" and history[-1]["data"]["kind"] == "exited"
    # the state machine's own fold: it accepts a start from Error
    assert plane.statemachine.states[name].phase.value == "Error"
    reply = await client.start(name)
    assert reply.accepted
    await client.wait_for(name, "Ready", reply.seq)
    # the audit tools and the operators' stream
    (failed,) = [e for e in await reading.history(js, name) if "failed" in e["type"]]
    assert failed["type"] == "sandboxctl.sandbox.failed.v2" and failed["data"]["kind"] == "exited"
    code, out, _ = await cli("events", "-o", "json", "--type", "failed")
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["sandboxctl.sandbox.failed.v2"]
    code, out, err = await cli("audit", "replay")
    assert code == 0 and json.loads(out)["differences"] == [], err
    code, out, err = await cli("audit", "verify")
    assert code == 0, out + err
