"""``sandboxctl cp`` on every engine: a tree of files goes into a sandbox and comes back exact
(checked by checksum), on a Ready sandbox and on a Stopped one, which stays Stopped; a large file
streams through the command line without being held in its memory; what a sandbox sends back is
untrusted (a link out of the destination is refused, nothing lands outside it); bad paths are
refused before anything is touched; each copy is in the log. The path rules are
tests/unit/test_copy.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from sandboxctl.client import EXIT_STATUS, SandboxClient
from sandboxctl.events.replies import ErrorCode
from sandboxctl.runtime.config import Config
from sandboxctl.statemachine import Phase
from tests.conftest import CLI, ROOT, Engine

# The command line, which writes its own peak memory (KiB) to $PEAK_FILE as it exits: VmHWM, the
# high-water mark of this program's memory (getrusage's ru_maxrss would count the forking parent's).
PEAK = """
import atexit, os, sys
from sandboxctl.cli.main import main
peak = lambda: [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
atexit.register(lambda: open(os.environ["PEAK_FILE"], "w").write(peak()))
main(sys.argv[1:])
"""
INVALID = EXIT_STATUS[ErrorCode.INVALID_ARGUMENT]
NOT_FOUND = EXIT_STATUS[ErrorCode.NOT_FOUND]


def tree(root: Path) -> dict[str, str]:
    """Every file, directory and link under ``root``: its checksum, ``dir``, or its target."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def make_tree(root: Path) -> None:
    (root / "src" / "deep" / "er").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "README").write_text("hello\n")
    (root / "src" / "main.py").write_text("print('hi')\n" * 1000)
    (root / "src" / "deep" / "er" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "src" / "deep" / "name with spaces é.txt").write_text("unicode\n")
    (root / "src" / "link").symlink_to("main.py")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)


async def copied(client: SandboxClient, name: str) -> list[dict[str, object]]:
    return [e["data"] for e in await client.history(name) if e["type"].endswith("copied.v1")]


async def test_a_tree_goes_in_and_comes_back_exact_on_a_ready_and_on_a_stopped_sandbox(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine, tmp_path: Path
) -> None:
    name = names.new("cp")
    assert (await cli("create", name, "--image", image, "--driver", engine.name))[0] == 0
    project = tmp_path / "project"
    make_tree(project)
    code, out, err = await cli("cp", str(project), f"{name}:/workspace/")
    assert code == 0 and f"{name}:/workspace/project" in out, err
    sums = engine("exec", f"sandboxctl-{name}", "sha256sum", "/workspace/project/src/deep/er/blob.bin").stdout
    assert sums.split()[0] == hashlib.sha256((project / "src/deep/er/blob.bin").read_bytes()).hexdigest()
    back = tmp_path / "back"
    back.mkdir()
    code, _, err = await cli("cp", f"{name}:project", str(back))  # relative: in /workspace
    assert code == 0, err
    assert tree(back / "project") == tree(project)
    assert os.stat(back / "project" / "run.sh").st_mode & 0o777 == 0o755

    # Stopped: the workspace is there, and a copy does not start it
    assert (await cli("stop", name, "--grace", "0"))[0] == 0
    code, _, err = await cli("cp", str(project / "README"), f"{name}:/workspace/notes.txt")  # to a new name
    assert code == 0, err
    code, _, err = await cli("cp", f"{name}:/workspace/project/src", str(tmp_path / "src-again"))
    assert code == 0, err
    assert tree(tmp_path / "src-again") == tree(project / "src")
    code, _, err = await cli("cp", f"{name}:/workspace/notes.txt", str(tmp_path / "notes"))
    assert code == 0 and (tmp_path / "notes").read_text() == "hello\n", err
    item = await client.get(name)
    assert item["phase"] == "Stopped" and engine.state(name)["Running"] is False
    # and the files are the sandbox's: started again, it has them
    assert (await cli("start", name))[0] == 0
    assert engine("exec", f"sandboxctl-{name}", "cat", "/workspace/notes.txt").stdout == "hello\n"
    records = await copied(client, name)
    assert [(r["direction"], r["path"]) for r in records] == [
        ("in", "/workspace/project"), ("out", "/workspace/project"), ("in", "/workspace/notes.txt"),
        ("out", "/workspace/project/src"), ("out", "/workspace/notes.txt"),
    ]  # fmt: skip
    assert all(int(r["size"]) > 0 for r in records)


async def test_a_large_file_streams_through_without_being_held_in_memory(
    config: Config, client: SandboxClient, plane, names, image: str, engine: Engine, tmp_path: Path
) -> None:
    name = names.new("big")
    reply = await client.create(name, image, driver=engine.name)
    await client.wait_for(name, Phase.READY, reply.seq)
    big = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with big.open("wb") as f:
        for _ in range(256):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)
    env = {
        **os.environ,
        "SANDBOXCTL_NATS_URL": config.nats_url,
        "SANDBOXCTL_PODMAN_URL": config.podman_url,
        "SANDBOXCTL_DOCKER_URL": config.docker_url,
        "SANDBOXCTL_DRIVERS": ",".join(config.drivers),
    }
    peaks = []
    for argv in (
        ("cp", str(big), f"{name}:/workspace/big.bin"),
        ("cp", f"{name}:/workspace/big.bin", str(tmp_path / "out.bin")),
    ):
        rss = tmp_path / "rss"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PEAK, *argv, env={**env, "PEAK_FILE": str(rss)}, cwd=ROOT, stderr=-1
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        peaks.append(int(rss.read_text()) // 1024)  # MiB
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == digest.hexdigest()
    # 256 MiB went through each way; the command line's own peak stays far below it
    print(f"\ncp of 256 MiB: the command line's peak memory {peaks[0]} MiB in, {peaks[1]} MiB out")
    assert max(peaks) < 128, peaks


async def test_what_a_sandbox_sends_back_cannot_land_outside_the_destination(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine, tmp_path: Path
) -> None:
    name = names.new("evil")
    assert (await cli("create", name, "--image", image, "--driver", engine.name))[0] == 0
    engine("exec", f"sandboxctl-{name}", "sh", "-c",
           "mkdir -p /workspace/d && echo ok > /workspace/d/fine && ln -s /etc/passwd /workspace/d/passwd "
           "&& ln -s ../../../outside /workspace/d/up")  # fmt: skip
    scratch = tmp_path / "scratch"
    dest = scratch / "a" / "b"
    dest.mkdir(parents=True)
    code, _, err = await cli("cp", f"{name}:/workspace/d", str(dest))
    assert code == INVALID and "refused a file the sandbox sent" in err, (code, err)
    assert not (dest / "d" / "passwd").exists()
    assert [str(p.relative_to(scratch)) for p in sorted(scratch.rglob("*")) if p.parts[-1] != "fine"] in (
        ["a", "a/b", "a/b/d"],
        ["a", "a/b"],
    )  # nothing outside the destination, and no link out of it


@pytest.mark.parametrize(
    ("argv", "code", "reason"),
    [
        (("here", "there"), INVALID, "one of SOURCE and DEST is NAME:PATH"),
        (("{name}:/a", "{name}:/b"), INVALID, "one of SOURCE and DEST is NAME:PATH"),
        (("{local}", "{name}:../etc/x"), INVALID, "'..' is not allowed"),
        (("{local}", "{name}:/workspace/../etc"), INVALID, "'..' is not allowed"),
        (("{local}", "{name}:/proc/self/x"), INVALID, "proc is the kernel's"),
        (("{name}:/sys/kernel", "{tmp}"), INVALID, "sys is the kernel's"),
        (("{tmp}/missing", "{name}:/workspace/"), INVALID, "No such file"),
        (("{local}", "{name}:/workspace/nodir/"), INVALID, "no such directory in the sandbox"),
        (("{local}", "{name}:/nodir/file"), INVALID, "/nodir: no such directory in the sandbox"),
        (("{name}:/workspace/nothing", "{tmp}"), NOT_FOUND, "no /workspace/nothing in sandbox"),
        (("{local}", "nosuch:/workspace/"), NOT_FOUND, "nosuch"),
        (("{name}:/workspace/f", "{tmp}/no/dir/x"), INVALID, "no such directory here"),
    ],
)
async def test_bad_copies_are_refused_naming_the_problem_and_change_nothing(
    cli: CLI, client: SandboxClient, names, image: str, engine: Engine, tmp_path: Path,
    argv: tuple[str, str], code: int, reason: str,
) -> None:  # fmt: skip
    name = names.new("bad")
    assert (await cli("create", name, "--image", image, "--driver", engine.name))[0] == 0
    engine("exec", f"sandboxctl-{name}", "sh", "-c", "echo x > /workspace/f")
    local = tmp_path / "local.txt"
    local.write_text("x")
    before = json.dumps(await client.history(name))
    listing = engine("exec", f"sandboxctl-{name}", "ls", "-la", "/workspace").stdout
    args = [a.format(name=name, local=local, tmp=tmp_path) for a in argv]
    got, _, err = await cli("cp", *args)
    assert got == code and reason in err and len(err.splitlines()) == 1, (got, err)
    assert json.dumps(await client.history(name)) == before  # nothing recorded
    assert engine("exec", f"sandboxctl-{name}", "ls", "-la", "/workspace").stdout == listing
