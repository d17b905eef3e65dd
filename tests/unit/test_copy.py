"""The rules of ``sandboxctl cp`` that need no engine: which argument is the sandbox's, what a
path in a sandbox may be, and that an archive a sandbox sends is unpacked only inside the
destination. Copies through real engines are tests/e2e/test_copy.py."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxctl.cli.copy import CopyError, sandbox_path, split_remote, tar_chunks, unpack


def test_which_argument_names_a_sandbox() -> None:
    assert split_remote("box:/workspace/a") == ("box", "/workspace/a")
    assert split_remote("box:rel/a") == ("box", "rel/a")
    assert split_remote("box:") == ("box", "")
    for local in ("/abs/path", "./box:a", "relative", "../x:y", "bad.name:/x", "-x:/y"):
        assert split_remote(local) is None, local


def test_paths_in_a_sandbox_are_absolute_inside_it_and_never_climb_out() -> None:
    assert sandbox_path("notes.txt") == "/workspace/notes.txt"
    assert sandbox_path("/etc/hosts") == "/etc/hosts"
    assert sandbox_path("dir/") == "/workspace/dir/"
    assert sandbox_path("/workspace//a/./b") == "/workspace/a/b"
    for bad, why in (
        ("../etc/passwd", "'..' is not allowed"),
        ("/workspace/../../x", "'..' is not allowed"),
        ("/proc/1/root", "proc is the kernel's"),
        ("/sys", "sys is the kernel's"),
        ("/dev/sda", "dev is the kernel's"),
        ("a\x00b", "not a path"),
        ("a" * 5000, "not a path"),
        ("", "a path in the sandbox is needed"),
    ):
        with pytest.raises(CopyError, match=why):
            sandbox_path(bad)


def archive(*members: tarfile.TarInfo, data: bytes = b"x") -> Iterator[bytes]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    raw = buffer.getvalue()
    return iter([raw[i : i + 1000] for i in range(0, len(raw), 1000)])


def member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "hostile",
    [
        member("d/../../escape"),
        member("/abs/escape"),
        member("d/link", tarfile.SYMTYPE, "/etc/passwd"),
        member("d/up", tarfile.SYMTYPE, "../../../outside"),
        member("d/hard", tarfile.LNKTYPE, "/etc/passwd"),
        member("d/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "absolute", "abs-link", "up-link", "hard-link", "device"],
)
def test_an_archive_from_a_sandbox_cannot_write_outside_the_destination(
    tmp_path: Path, hostile: tarfile.TarInfo
) -> None:
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    if hostile.name.startswith("/"):  # made relative, so it lands inside the destination
        unpack(archive(member("d", tarfile.DIRTYPE), hostile), "d", dest, None)
        assert (dest / "abs" / "escape").is_file()
    else:
        with pytest.raises(CopyError, match="refused a file the sandbox sent"):
            unpack(archive(member("d", tarfile.DIRTYPE), member("d/ok"), hostile), "d", dest, None)
    outside = [p for p in tmp_path.rglob("*") if dest not in (p, *p.parents) and p != tmp_path / "a"]
    assert outside == []
    assert not any(p.is_symlink() or p.is_char_device() for p in tmp_path.rglob("*"))


def test_the_top_of_an_archive_is_renamed_to_the_destination_name(tmp_path: Path) -> None:
    size = unpack(archive(member("d", tarfile.DIRTYPE), member("d/f")), "d", tmp_path, "renamed")
    assert (tmp_path / "renamed" / "f").read_bytes() == b"x" and size > 0


def test_a_local_tree_is_archived_in_chunks_by_a_thread(tmp_path: Path) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f").write_bytes(b"y" * 700_000)
    chunks, errors, size = tar_chunks(tmp_path / "src", "named")
    parts = list(chunks)
    assert len(parts) > 1 and not errors and size[0] == sum(map(len, parts))
    with tarfile.open(fileobj=io.BytesIO(b"".join(parts))) as tar:
        assert sorted(tar.getnames()) == ["named", "named/sub", "named/sub/f"]
