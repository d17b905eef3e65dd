"""What survives what, on every engine: for each operation a sandbox goes through (stop and start,
pause and resume, a host reboot, an update of its resources, a clone, an archive), which of its parts are
kept, checked part by part against the table in docs/survival.md, which this test also checks is
the table it checks. A part is kept when it reads the same after the operation as before (for a
clone: when the clone reads what its source read)."""

from __future__ import annotations

import asyncio

import pytest

from sandboxctl.client import SandboxClient
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from sandboxctl.statemachine import Phase
from tests.conftest import CLI, ROOT, Engine

PARTS = ("workspace", "image", "env", "labels", "resources", "processes", "memory", "/tmp", "writable layer")
K, L = "kept", "lost"
# The table of docs/survival.md: operation -> what happens to each part, in PARTS order.
TABLE: dict[str, tuple[str, ...]] = {
    "stop, start": (K, K, K, K, K, L, L, K, K),
    "pause, resume": (K, K, K, K, K, K, K, K, K),
    "host reboot": (K, K, K, K, K, L, L, K, K),
    "update --memory (stopped), start": (K, K, K, K, "changed", L, L, L, L),
    "clone (the clone has)": (K, K, K, K, K, L, L, L, L),
    "stop, archive, start": (K, K, K, K, K, L, L, L, L),
}
# The main process keeps a token of its own and a count in memory, and writes both to the
# workspace (whole, by a rename, so a read never sees half): the same token is the same
# process; a count that went on is its memory.
MAIN = [
    "sh", "-c",
    "tok=$(cat /proc/sys/kernel/random/uuid); i=0; trap 'exit 0' TERM; "
    "while :; do i=$((i+1)); echo \"$tok $i\" > /workspace/.state; mv /workspace/.state /workspace/state; "
    "sleep 0.05; done",
]  # fmt: skip
MEMORY = 64 * 2**20


def read(engine: Engine, name: str, path: str) -> str:
    return engine("exec", f"sandboxctl-{name}", "cat", path, check=False).stdout.strip()


async def parts(client: SandboxClient, engine: Engine, name: str) -> dict[str, object]:
    """Each part as it reads now (the sandbox is Ready)."""
    item = await client.get(name)
    token, count = [*read(engine, name, "/workspace/state").split(), "", "0"][:2]
    return {
        "workspace": read(engine, name, "/workspace/kept"),
        "image": item["image"],
        "env": engine("exec", f"sandboxctl-{name}", "sh", "-c", "echo $A").stdout.strip(),
        "labels": item["labels"],
        "resources": item["resources"],
        "processes": token,
        "memory": int(count),
        "/tmp": read(engine, name, "/tmp/t"),
        "writable layer": read(engine, name, "/root/layer"),
    }


def verdicts(before: dict[str, object], after: dict[str, object]) -> tuple[str, ...]:
    def one(part: str) -> str:
        if part == "memory":  # the count went on from where it was, or started again
            return K if before["processes"] == after["processes"] and int(after[part]) >= int(before[part]) else L  # type: ignore[call-overload]
        if part == "resources" and after[part] != before[part]:
            return "changed"
        return K if after[part] == before[part] and after[part] not in ("", None) else L

    return tuple(one(part) for part in PARTS)


def table_markdown() -> str:
    head = "| operation | " + " | ".join(PARTS) + " |"
    rule = "|---" * (len(PARTS) + 1) + "|"
    rows = [f"| {op} | " + " | ".join(cells) + " |" for op, cells in TABLE.items()]
    return "\n".join([head, rule, *rows])


def test_the_documented_table_is_the_one_tested() -> None:
    assert table_markdown() in (ROOT / "docs" / "survival.md").read_text()


@pytest.mark.parametrize("operation", list(TABLE))
async def test_what_each_operation_keeps(
    config: Config, plane: ControlPlane, cli: CLI, client: SandboxClient, names, image: str, engine: Engine,
    operation: str,
) -> None:  # fmt: skip
    name = names.new("sv")
    code, _, err = await cli(
        "create", name, "--image", image, "--driver", engine.name, "--env", "A=alpha", "--label", "k=v",
        "--memory", "64m", "--", *MAIN,
    )  # fmt: skip
    assert code == 0, err
    engine("exec", f"sandboxctl-{name}", "sh", "-c",
           "echo ws > /workspace/kept; echo tmp > /tmp/t; echo layer > /root/layer")  # fmt: skip
    await asyncio.sleep(0.3)
    before = await parts(client, engine, name)
    after_name, rebooted = name, None
    if operation == "stop, start":
        assert (await cli("stop", name, "--grace", "1"))[0] == 0
        assert (await cli("start", name))[0] == 0
    elif operation == "pause, resume":
        assert (await cli("pause", name))[0] == 0
        await asyncio.sleep(0.3)
        assert (await cli("resume", name))[0] == 0
    elif operation == "host reboot":
        # A power cut: nothing of sandboxctl runs, the container's processes are killed, then all comes back.
        seen = (await client.get(name))["last_seq"]
        await plane.stop()
        engine("kill", f"sandboxctl-{name}")
        rebooted = await ControlPlane(config).start()
        await client.wait_for(name, Phase.READY, seen + 1, timeout=30)
    elif operation.startswith("update"):
        assert (await cli("stop", name, "--grace", "1"))[0] == 0
        assert (await cli("update", name, "--memory", "128m"))[0] == 0
        assert (await cli("start", name))[0] == 0
    elif operation.startswith("stop, archive"):
        assert (await cli("stop", name, "--grace", "1"))[0] == 0
        assert (await cli("archive", name))[0] == 0
        assert not engine.volume_exists(name) and not engine.container_exists(name)
        assert (await cli("start", name))[0] == 0
    else:
        after_name = names.new("svc")
        code, _, err = await cli("clone", name, after_name)
        assert code == 0, err
    try:
        await asyncio.sleep(0.3)
        after = await parts(client, engine, after_name)
    finally:
        if rebooted is not None:
            await rebooted.stop()
    assert verdicts(before, after) == TABLE[operation], (before, after)
