"""Clones on every engine: a new sandbox starts with an exact copy of another's workspace (a tree
of files compared by checksum, mode and link) and what it is made of, with the create flags
overriding; the source may be Stopped, Paused or Ready (paused for the copy and resumed, as its
log shows) and is left as it was; a clone onto an existing name, of a missing sandbox or of one
in another phase is refused and changes nothing. The decisions are tests/unit/test_clone.py."""

from __future__ import annotations

import json

import pytest

from sandboxctl.client import EXIT_STATUS, SandboxClient
from sandboxctl.events.replies import ErrorCode
from sandboxctl.statemachine import Phase
from tests.conftest import CLI, Engine

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]
# Every path of a workspace with what it holds: a file's checksum and mode, a link's target.
LISTING = (
    "cd /w && find . | sort | while read -r f; do "
    'if [ -L "$f" ]; then echo "$f -> $(readlink "$f")"; '
    'elif [ -d "$f" ]; then echo "$f/ $(stat -c %a "$f")"; '
    'else echo "$f $(sha256sum < "$f" | cut -c1-64) $(stat -c %a "$f")"; fi; done'
)
TREE = (
    "mkdir -p /workspace/src/deep /workspace/empty && cd /workspace && "
    "head -c 3000000 /dev/urandom > src/deep/blob && echo hello > README && "
    "printf '#!/bin/sh\\n' > run.sh && chmod 755 run.sh && chmod 700 src/deep && "
    "ln -s README src/link && echo 'a b' > 'src/with space'"
)


def listing(engine: Engine, image: str, name: str) -> list[str]:
    volume = f"sandboxctl-{name}-workspace"
    out = engine("run", "--rm", "--network", "none", "-v", f"{volume}:/w", image, "sh", "-c", LISTING).stdout
    return out.splitlines()


@pytest.mark.parametrize("source_phase", ["Stopped", "Ready", "Paused"])
async def test_a_clone_starts_with_an_exact_copy_of_the_workspace_and_what_the_source_is_made_of(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine, source_phase: str
) -> None:
    src, new = names.new("src"), names.new("new")
    code, _, err = await cli(
        "create", src, "--image", image, "--driver", engine.name, "--label", "team=red", "--env", "A=1",
        "--memory", "64m", "--", *SLEEPER,
    )  # fmt: skip
    assert code == 0, err
    engine("exec", f"sandboxctl-{src}", "sh", "-c", TREE)
    if source_phase == "Stopped":
        assert (await cli("stop", src, "--grace", "0"))[0] == 0
    elif source_phase == "Paused":
        assert (await cli("pause", src))[0] == 0
    before = (await client.get(src))["last_seq"]
    expected = listing(engine, image, src)
    assert len(expected) > 8, expected

    code, _, err = await cli("clone", src, new, "--label", "copy=yes", "--env", "B=2")
    assert code == 0, err
    assert ("paused for the copy and resumed" in err) is (source_phase == "Ready"), err
    item = await client.get(new)
    assert item["phase"] == "Ready" and item["image"] == image, item
    assert item["labels"] == {"team": "red", "copy": "yes"} and item["env"] == {"A": "1", "B": "2"}
    assert item["resources"] == {"memory": 64 * 2**20} and item["driver"] == engine.name
    assert listing(engine, image, new) == expected  # the same tree: contents, modes, links
    assert engine("exec", f"sandboxctl-{new}", "sh", "-c", "echo $A$B").stdout == "12\n"
    (created,) = [e for e in await client.history(new) if e["type"].endswith("created.v1")]
    assert created["data"]["clone_from"] == src
    assert created["data"].get("clone_paused", False) is (source_phase == "Ready")

    # the source is as it was, and the two workspaces are apart from now on
    src_item = await client.wait_for(src, Phase(source_phase), timeout=15)  # its resume may still be on its way
    assert src_item["phase"] == source_phase, [(e["seq"], e["type"], e["actor"]) for e in await client.history(src)]
    if source_phase == "Ready":
        moves = [e["type"].split(".")[2] for e in await client.history(src) if e["seq"] > before]
        assert moves in (["paused", "ready"], []), moves  # paused for the copy and resumed (if the watcher saw it)
        assert engine.state(src)["Paused"] is False
    engine("exec", f"sandboxctl-{new}", "sh", "-c", "echo changed > /workspace/README")
    assert listing(engine, image, src) == expected


async def test_a_clone_that_cannot_be_made_is_refused_and_changes_nothing(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine
) -> None:
    src, taken, job = names.new("src"), names.new("taken"), names.new("job")
    for name in (src, taken):
        assert (await cli("create", name, "--image", image, "--driver", engine.name))[0] == 0
    reply = await client.create(job, image, ["true"], driver=engine.name)
    await client.wait_for(job, Phase.COMPLETED, reply.seq)
    histories = {n: json.dumps(await client.history(n)) for n in (src, taken)}
    for argv, code, reason in (
        ((src, taken), ErrorCode.ALREADY_EXISTS, f"sandbox {taken} already exists"),
        ((names.new("gone"), names.new("x")), ErrorCode.NOT_FOUND, "not found"),
        ((src, src), ErrorCode.INVALID_ARGUMENT, "cannot be cloned onto itself"),
        ((job, names.new("y")), ErrorCode.FAILED_PRECONDITION, "is Completed; clone is allowed from Stopped"),
        ((src, "bad.name"), ErrorCode.INVALID_ARGUMENT, "invalid sandbox name"),
    ):
        got, _, err = await cli("clone", *argv)
        assert got == EXIT_STATUS[code] and reason in err and len(err.splitlines()) == 1, (argv, got, err)
    assert {n: json.dumps(await client.history(n)) for n in (src, taken)} == histories
