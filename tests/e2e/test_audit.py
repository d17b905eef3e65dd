"""The audit tools and the operators' event stream, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from datetime import UTC, datetime

from sandboxctl.client import SandboxClient
from sandboxctl.events import SandboxStopped, subjects
from sandboxctl.events.envelope import Envelope, encode, now, type_name
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane, NatsServer
from tests.conftest import CLI, ROOT


async def _lifecycle(client: SandboxClient, name: str, image: str) -> None:
    await client.create(name, image, labels={"team": "audit"})
    await client.wait_for(name, "Ready")
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)


async def test_history_covers_deleted_sandboxes_with_actor_cause_and_phase(
    cli: CLI, client: SandboxClient, names, image: str
) -> None:
    name = names.new()
    await _lifecycle(client, name, image)
    reply = await client.delete(name)
    await client.wait_for(name, "Deleted", reply.seq)
    code, out, err = await cli("audit", "history", name, "-o", "json")
    assert code == 0, err
    items = json.loads(out)
    assert [i["type"].split(".")[2] for i in items] == [
        "created", "ready", "stop_requested", "stopped", "delete_requested", "deleted",
    ]  # fmt: skip
    assert [i["phase"] for i in items] == ["Provisioning", "Ready", "Stopping", "Stopped", "Deleting", "Deleted"]
    assert items[0]["actor"] == "test" and items[2]["actor"] == "test"
    assert items[1]["causationid"] and items[1]["actor"].startswith("sandboxctl/driver/")  # caused by a fact
    assert all(i["correlationid"] for i in items) and items[2]["causationid"] == items[2]["correlationid"]
    code, _, err = await cli("audit", "history", "never-was")
    assert code == 3 and "not_found" in err


async def test_state_as_of_a_sequence_and_a_time(cli: CLI, client: SandboxClient, names, image: str) -> None:
    name = names.new()
    await client.create(name, image)
    ready = await client.wait_for(name, "Ready")
    await asyncio.sleep(0.05)
    between = datetime.now(UTC).isoformat()
    await asyncio.sleep(0.05)
    reply = await client.stop(name)
    await client.wait_for(name, "Stopped", reply.seq)
    code, out, err = await cli("audit", "state", name, "--as-of", str(ready["last_seq"]))
    assert code == 0, err
    assert json.loads(out)["phase"] == "Ready" and json.loads(out)["seq"] == ready["last_seq"]
    code, out, err = await cli("audit", "state", name, "--as-of", between)
    assert code == 0 and json.loads(out)["phase"] == "Ready", err
    code, out, _ = await cli("audit", "state", name, "--as-of", str(reply.seq))
    stopping = json.loads(out)
    assert stopping["phase"] == "Stopping"
    # its moments as ISO 8601, not Unix time: when it began stopping, and when the engine kills
    began, kill_at = datetime.fromisoformat(stopping["since"]), datetime.fromisoformat(stopping["stop_by"])
    assert began.tzinfo is not None and began < kill_at and abs((datetime.now(UTC) - began).total_seconds()) < 120
    code, out, _ = await cli("audit", "state", name, "--as-of", str(reply.seq), "-o", "table")
    assert code == 0 and "Stopping" in out
    code, _, err = await cli("audit", "state", name, "--as-of", "1999-01-01T00:00:00Z")
    assert code == 3 and "did not exist" in err
    code, _, err = await cli("audit", "state", name, "--as-of", "yesterday")
    assert code == 2 and "invalid_argument" in err


async def test_replay_matches_and_then_finds_a_tampered_row(
    config: Config, plane: ControlPlane, cli: CLI, client: SandboxClient, names, image: str, tmp_path
) -> None:
    a, b = names.new(), names.new()
    await _lifecycle(client, a, image)
    await client.create(b, image)
    await client.wait_for(b, "Ready")
    code, out, err = await cli("audit", "replay")
    assert code == 0, err
    report = json.loads(out)
    assert report["compared"] and report["differences"] == [] and report["sandboxes"] == 2 and report["events"] >= 6
    # --until writes a projection of the past
    code, out, err = await cli("audit", "replay", "--until", "3", "--output", str(tmp_path / "past.sqlite3"))
    assert code == 0 and json.loads(out)["replayed_to"] == 3, err
    with sqlite3.connect(tmp_path / "past.sqlite3") as db:
        assert db.execute("SELECT seq FROM checkpoint").fetchone() == (3,)

    await plane.projector.stop()  # nothing may repair the file while we tamper with it
    with sqlite3.connect(config.projection_path) as db:
        db.execute("UPDATE sandboxes SET phase = 'Ready' WHERE name = ?", (a,))
    code, out, err = await cli("audit", "replay")
    assert code == 10 and "1 rows differ" in err
    (diff,) = json.loads(out)["differences"]
    assert diff["table"] == "sandboxes" and diff["key"] == a
    assert "Ready" in diff["live"] and "Stopped" in diff["replayed"]


async def test_replay_reports_a_projection_that_stopped_behind_the_log(
    config: Config, plane: ControlPlane, cli: CLI, client: SandboxClient, names, image: str
) -> None:
    """A projector that died leaves a projection that agrees with the log up to where it stopped:
    replay must measure it against the log's head, not only up to its own checkpoint."""
    name = names.new()
    await client.create(name, image)
    await client.wait_for(name, "Ready")
    await plane.projector.stop()  # dead, as after a write error nobody restarted it
    reply = await client.stop(name)
    code, out, err = await cli("audit", "replay")
    report = json.loads(out)
    assert code == 10 and "behind the log's head" in err, err
    assert report["differences"] == [] and report["log_head"] >= reply.seq > report["live_position"]
    assert report["behind"] == report["log_head"] - report["live_position"]


async def test_verify_passes_a_clean_log_and_reports_a_crafted_one(
    plane: ControlPlane, cli: CLI, client: SandboxClient, names, image: str
) -> None:
    name = names.new()
    await _lifecycle(client, name, image)
    code, out, err = await cli("audit", "verify")
    assert code == 0 and "no violations" in out, err

    js = plane.statemachine.js
    last = (await js.get_last_msg(subjects.LOG_STREAM, subjects.log(name))).seq

    def crafted(event_id: str) -> bytes:
        return encode(
            Envelope(
                id=event_id, type=type_name(SandboxStopped), source="forger", subject=name, time=now(),
                data=SandboxStopped(exit_code=0),
            )
        )  # fmt: skip

    # Stopped while Stopped: a transition the machine does not allow, properly guarded.
    bad = await js.publish(
        subjects.log(name), crafted("forged-1"), headers={"Nats-Expected-Last-Subject-Sequence": str(last)}
    )
    # And one appended with no sequence guard at all, reusing an event id.
    unguarded = await js.publish(subjects.log(name), crafted("forged-1x"), headers={"Nats-Msg-Id": "other"})
    code, out, err = await cli("audit", "verify")
    assert code == 10 and "violations" in err
    lines = out.splitlines()
    assert any(line.split()[0] == str(bad.seq) and "not allowed" in line for line in lines)
    assert any(line.split()[0] == str(unguarded.seq) and "without a sequence guard" in line for line in lines)


async def test_export_jsonl_with_filters(cli: CLI, client: SandboxClient, names, image: str, tmp_path) -> None:
    a, b = names.new(), names.new()
    await _lifecycle(client, a, image)
    await _lifecycle(client, b, image)
    out_file = tmp_path / "audit.jsonl"
    code, _, err = await cli("audit", "export", "--format", "jsonl", "--output", str(out_file))
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 8 and [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    assert {"id", "type", "source", "subject", "time", "data", "actor", "correlationid", "causationid"} <= set(rows[0])
    code, out, _ = await cli("audit", "export", "--sandbox", b, "--type", "stopped")
    (only,) = [json.loads(line) for line in out.splitlines()]
    assert only["subject"] == b and only["type"] == "sandboxctl.sandbox.stopped.v1"
    code, out, _ = await cli("audit", "export", "--since", str(rows[4]["seq"]), "--until", str(rows[5]["seq"]))
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [rows[4]["seq"], rows[5]["seq"]]


async def test_events_follow_with_a_type_filter_survives_a_server_restart(
    config: Config, nats_server: NatsServer, plane: ControlPlane, client: SandboxClient, names, image: str
) -> None:
    first = names.new()
    await client.create(first, image)
    await client.wait_for(first, "Ready")
    env = {**os.environ, "SANDBOXCTL_NATS_URL": config.nats_url}
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxctl.cli", "events", "--follow", "--type", "ready", "-o", "json",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert follower.stdout is not None
    try:
        line = json.loads(await asyncio.wait_for(follower.stdout.readline(), 10))
        assert line["subject"] == first and line["type"] == "sandboxctl.sandbox.ready.v1"

        second = names.new()
        await client.create(second, image)
        line = json.loads(await asyncio.wait_for(follower.stdout.readline(), 10))
        assert line["subject"] == second

        await plane.stop()
        await client.close()
        nats_server.stop()
        nats_server.start()  # same port, same store: the log is still there
        again = await ControlPlane(config).start()
        client2 = await SandboxClient.connect(config.nats_url, actor="test")
        try:
            third = names.new()
            await client2.create(third, image)
            await client2.wait_for(third, "Ready")
            reply = await client2.stop(second)
            await client2.wait_for(second, "Stopped", reply.seq)
            reply = await client2.start(second)
            await client2.wait_for(second, "Ready", reply.seq)
            seen = [json.loads(await asyncio.wait_for(follower.stdout.readline(), 15)) for _ in range(2)]
            assert [(e["subject"], e["type"].split(".")[2]) for e in seen] == [(third, "ready"), (second, "ready")]
            assert seen[0]["seq"] > line["seq"]
            assert follower.returncode is None  # still following
            try:  # and nothing is repeated after the restart
                repeated = await asyncio.wait_for(follower.stdout.readline(), 1.0)
            except TimeoutError:
                repeated = b""
            assert repeated == b""
        finally:
            await client2.close()
            await again.stop()
    finally:
        follower.terminate()
        await follower.wait()


async def test_top_once_summarises_phases_and_errors(cli: CLI, client: SandboxClient, names, image: str) -> None:
    a, b = names.new(), names.new()
    await client.create(a, image)
    await client.create(b, image)
    await client.wait_for(a, "Ready")
    await client.wait_for(b, "Ready")
    reply = await client.stop(b)
    await client.wait_for(b, "Stopped", reply.seq)
    code, out, err = await cli("top", "--once", "--interval", "0.2")
    assert code == 0, err
    assert "2 sandboxes" in out and "Ready: 1" in out and "Stopped: 1" in out and "nothing in Error" in out
