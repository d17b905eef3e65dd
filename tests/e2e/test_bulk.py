"""Bulk commands by selector, on the server: ``stop|start|pause|resume|delete --selector`` (or
``--all``) is one command to the state machine, which fans it out as one command per sandbox
it takes in, each logged as if sent alone and correlated to the bulk command; a retry with the
same id acts on no sandbox twice; each sandbox's result is printed. The selection rules are
tests/unit/test_bulk.py."""

from __future__ import annotations

import asyncio
import json

from sandboxctl.client import SandboxClient
from sandboxctl.events.replies import ErrorCode
from sandboxctl.statemachine import Phase
from tests.conftest import CLI

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]


async def made(client: SandboxClient, image: str, names, labels: list[dict[str, str]]) -> list[str]:
    made = [names.new(f"b{i}") for i in range(len(labels))]
    replies = await asyncio.gather(
        *(client.create(n, image, SLEEPER, labels=lab) for n, lab in zip(made, labels, strict=True))
    )
    await asyncio.gather(*(client.wait_for(n, Phase.READY, r.seq) for n, r in zip(made, replies, strict=True)))
    return made


async def test_a_bulk_stop_by_selector_is_one_command_fanned_out_and_a_retry_acts_on_none_twice(
    cli: CLI, client: SandboxClient, names, image: str
) -> None:
    prefix = names.new("x")  # a label of this test's own, so other sandboxes are never taken in
    red = {"run": prefix, "team": "red"}
    r1, r2, r3, stopped, b1 = await made(
        client, image, names, [red, red, {**red, "tier": "a"}, red, {"run": prefix, "team": "blue"}]
    )
    assert (await cli("stop", stopped, "--grace", "0"))[0] == 0
    code, out, err = await cli("stop", "--selector", f"run={prefix}", "--selector", "team=red", "--grace", "0")
    assert code == 0, err
    lines = out.splitlines()
    assert sorted(lines[:-1]) == sorted(f"{n}: stopped" for n in (r1, r2, r3)) and lines[-1] == "3 sandboxes stopped"
    for n in (r1, r2, r3, stopped):
        assert (await client.get(n))["phase"] == "Stopped"
    assert (await client.get(b1))["phase"] == "Ready"  # not selected: untouched
    # each sandbox's stop is its own, in its own log, all correlated to the one bulk command
    stops = [[e for e in await client.history(n) if e["type"].endswith("stop_requested.v1")][-1] for n in (r1, r2, r3)]
    assert len({s["correlationid"] for s in stops}) == 1 and len({s["causationid"] for s in stops}) == 3
    before = {n: len(await client.history(n)) for n in (r1, r2, r3, b1)}

    # the SDK's bulk, sent twice with one id: the second acts on no sandbox again
    first = [
        item async for page in client.bulk("start", {"run": prefix}, command_id="bulk-start-1") for item in page.items
    ]
    again = [
        item async for page in client.bulk("start", {"run": prefix}, command_id="bulk-start-1") for item in page.items
    ]
    assert [i.name for i in first] == sorted((r1, r2, r3, stopped)) and first == again
    assert all(i.accepted and i.appended == 1 for i in first)
    for n in (r1, r2, r3, stopped):
        await client.wait_for(n, Phase.READY, next(i.seq for i in first if i.name == n))
    assert {n: len(await client.history(n)) for n in (r1, r2, r3)} == {n: before[n] + 2 for n in (r1, r2, r3)}
    assert len(await client.history(b1)) == before[b1]

    # pause and resume by selector; list by selector
    code, out, err = await cli("pause", "--selector", "team=blue", "--selector", f"run={prefix}")
    assert code == 0 and f"{b1}: paused" in out, err
    code, out, _ = await cli("list", "--selector", f"run={prefix}", "--phase", "Paused", "-o", "json")
    assert [i["name"] for i in json.loads(out)] == [b1]
    code, out, err = await cli("resume", "-l", f"run={prefix}")
    assert code == 0 and out.splitlines() == [f"{b1}: resumed", "1 sandbox resumed"], out
    # delete by selector needs a yes from a script, like --all
    code, _, err = await cli("delete", "--selector", f"run={prefix}")
    assert code != 0 and "--yes" in err and (await client.get(r1))["phase"] == "Ready", err
    code, out, err = await cli("delete", "--selector", f"run={prefix}", "--yes")
    assert code == 0 and out.splitlines()[-1] == "5 sandboxes deleted", err


async def test_a_bulk_command_must_say_what_it_takes_in(client: SandboxClient) -> None:
    for body in (
        {},
        {"all": True, "selector": {"a": "b"}},
        {"selector": {"bad key": "x"}},
        {"all": True, "verb": "frob"},
    ):
        command = {"type": "sandboxctl.command.bulk.v1", "command_id": "b-1", "verb": "stop", **body}
        reply = await client._request("sandboxctl.cmd.bulk", json.dumps(command).encode())
        assert reply.error is not None and reply.error.code == ErrorCode.INVALID_ARGUMENT, (body, reply)
