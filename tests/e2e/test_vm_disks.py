"""The VM driver's disks (drivers/vm/disks.py), made and checked with the real tools: podman,
mkfs.ext4, e2fsck; what is on a disk is read back with debugfs, never by mounting it."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from sandboxctl.drivers.vm import disks
from sandboxctl.drivers.vm.disks import DiskError
from tests.conftest import ROOT, podman

MIB = 1 << 20


@pytest.fixture(autouse=True)
def build_label(monkeypatch: pytest.MonkeyPatch) -> str:
    """A build label of the test's own, so its throwaway containers are told from any other's."""
    label = f"{disks.BUILD_LABEL}-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(disks, "BUILD_LABEL", label)
    return label


def debugfs(disk: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(disk)], capture_output=True, text=True, check=True).stdout


def label(disk: Path) -> str:
    return subprocess.run(["e2label", str(disk)], capture_output=True, text=True, check=True).stdout.strip()


def fsck_clean(disk: Path) -> bool:
    """Whether a forced, read-only e2fsck finds nothing wrong."""
    return subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True).returncode == 0


def debugfs_write(disk: Path, *requests: str) -> None:
    script = "".join(f"{request}\n" for request in requests)
    subprocess.run(["debugfs", "-w", "-f", "-", str(disk)], input=script, capture_output=True, text=True, check=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_containers() -> list[str]:
    """The throwaway containers of root builds that exist now."""
    out = podman("ps", "-a", "--filter", f"label={disks.BUILD_LABEL}", "--format", "{{.Names}}").stdout
    return out.split()


def leftovers(directory: Path, keep: str = "") -> list[str]:
    """What is in ``directory`` besides lock files and ``keep``: temporary files a build left."""
    return sorted(p.name for p in directory.iterdir() if p.suffix != ".lock" and p.name != keep)


# -- the root disk ---------------------------------------------------------------------------------


def test_root_disk_holds_the_images_filesystem_and_is_built_once(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    disk = disks.root_disk(image, cache)

    ident = disks.image_info(image).id
    assert disk == cache / f"{ident}.ext4"
    assert stat.S_IMODE(disk.stat().st_mode) == 0o444
    assert label(disk) == disks.LABEL_ROOT
    assert fsck_clean(disk)
    busybox = debugfs(disk, "stat /bin/busybox")
    assert "Type: regular" in busybox and "Mode:  0755" in busybox
    assert 'Fast link dest: "busybox"' in debugfs(disk, "stat /bin/sh")
    dumped = tmp_path / "busybox"
    debugfs(disk, f"dump /bin/busybox {dumped}")
    inside = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", image, "cat", "/bin/busybox"], capture_output=True
    )
    assert inside.returncode == 0 and dumped.read_bytes() == inside.stdout
    assert leftovers(cache, keep=disk.name) == []
    assert build_containers() == []

    # A second call finds it in place: no export, no mkfs, the same file.
    mtime = disk.stat().st_mtime_ns

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the root disk was built again")

    monkeypatch.setattr(disks, "_build_root", no_rebuild)
    started = time.monotonic()
    assert disks.root_disk(image, cache) == disk
    assert time.monotonic() - started < 2.0
    assert disk.stat().st_mtime_ns == mtime


def test_callers_at_once_build_the_root_disk_once(image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    builds: list[str] = []
    build = disks._build_root

    def counted(*args: object) -> None:
        builds.append(threading.current_thread().name)
        time.sleep(0.3)  # widen the window in which an unlocked second caller would start its own build
        build(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(disks, "_build_root", counted)
    barrier = threading.Barrier(3)
    results: list[Path | BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            results.append(disks.root_disk(image, cache))
        except BaseException as exc:
            results.append(exc)

    # What a build killed midway left is removed by the next one (it holds the image's lock).
    cache.mkdir()
    ident = disks.image_info(image).id
    (cache / f".{ident}.tree-stale").mkdir()
    (cache / f".{ident}.tree-stale" / "file").write_bytes(b"x")
    (cache / f".{ident}.ext4-stale").write_bytes(b"x")

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and len(set(results)) == 1, results
    assert isinstance(results[0], Path) and results[0].is_file()
    assert len(builds) == 1, builds
    assert fsck_clean(results[0])
    assert leftovers(cache, keep=results[0].name) == []


BUILD_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from typing import Any
from sandboxctl.drivers.vm import disks
build = disks._build_root
def counted(*args):
    print("built", flush=True)
    time.sleep(0.3)
    build(*args)
disks._build_root = counted
disks.BUILD_LABEL = sys.argv[3]
print(disks.root_disk(sys.argv[1], Path(sys.argv[2])))
"""


def test_processes_at_once_build_the_root_disk_once(image: str, tmp_path: Path, build_label: str) -> None:
    cache = tmp_path / "cache"
    argv = [sys.executable, "-c", BUILD_IN_A_PROCESS, image, str(cache), build_label]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=60)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    disk = str(cache / f"{disks.image_info(image).id}.ext4")
    assert sorted(outputs) == [[disk], ["built", disk]], outputs  # one built it, the other waited for it
    assert build_containers() == []


def test_a_missing_image_is_named_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = "localhost/sandboxctl-no-such-image:missing"
    with pytest.raises(DiskError, match=f"image {missing} is not in podman's storage: .+"):
        disks.root_disk(missing, cache)
    assert not cache.exists() or leftovers(cache) == []
    assert build_containers() == []


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no mkfs", r"mkfs\.ext4-missing is not installed: run scripts/setup-vm\.sh"),
        ("mkfs fails", r"mkfs\.ext4 failed: .+"),
    ],
)
def test_a_failed_build_names_the_image_and_leaves_nothing(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: str, message: str
) -> None:
    """A failure after the export (the tree unpacked, the container made) removes both."""
    cache = tmp_path / "cache"
    if breakage == "no mkfs":
        monkeypatch.setattr(disks, "MKFS", "mkfs.ext4-missing")
    else:  # a disk far too small for the tree: mkfs.ext4 itself fails, with its own message
        monkeypatch.setattr(disks, "_tree_size", lambda tree: (1 * MIB, 64))
    with pytest.raises(DiskError, match=f"^image {image}: {message}"):
        disks.root_disk(image, cache)
    assert leftovers(cache) == []
    assert build_containers() == []


def test_the_root_disk_through_an_engine_url(image: str, podman_url: str, tmp_path: Path) -> None:
    engine = ("podman", "--url", podman_url)
    disk = disks.root_disk(image, tmp_path / "cache", engine)
    assert disk.name == f"{disks.image_info(image, engine).id}.ext4" == f"{disks.image_info(image).id}.ext4"
    assert "Type: regular" in debugfs(disk, "stat /bin/busybox")
    assert build_containers() == []


def test_the_image_index_asks_the_engine_again_only_once_its_images_change(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    run = disks._run

    def counting(argv: Sequence[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if list(argv[1:3]) == ["image", "inspect"]:
            asked.append(argv[-1])
        return run(argv, *args, **kwargs)

    monkeypatch.setattr(disks, "_run", counting)
    index = disks.ImageIndex()
    first = index.info(image)
    assert first == disks.image_info(image) and len(first.id) == 64
    asked.clear()
    assert index.info(image) == first and asked == []  # podman's images unchanged: not asked again

    other = f"localhost/sandboxctl-index-test-{uuid.uuid4().hex[:8]}:latest"
    subprocess.run(["podman", "tag", image, other], check=True, capture_output=True)
    try:
        assert index.info(image) == first and asked == [image]  # a tag changed podman's index: asked
        assert index.info(other).id == first.id
    finally:
        subprocess.run(["podman", "rmi", other], check=True, capture_output=True)
    asked.clear()
    with pytest.raises(DiskError, match="is not in podman's storage"):
        index.info(other)  # untagged: the image under that name is gone, not remembered
    assert asked == [other]
    # reached by URL, the engine's files are not read: every call asks
    assert disks.ImageIndex(("podman", "--url", "unix:///nonexistent.sock"))._stamp() is None


# -- unpacking an image's tar ------------------------------------------------------------------------


def tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buffer.seek(0)
    return buffer


def entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "", uid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid = kind, mode, link, uid, uid
    return info


def test_unpacking_keeps_what_a_root_filesystem_needs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = tar(
        (entry("./", tarfile.DIRTYPE, 0o755), b""),
        (entry("tmp", tarfile.DIRTYPE, 0o1777), b""),
        (entry("/bin/su", mode=0o4755), b"su"),  # an absolute name lands in the tree
        (entry("bin/su-too", tarfile.LNKTYPE, 0o4755, link="/bin/su"), b""),
        (entry("etc/localtime", tarfile.SYMTYPE, link="/usr/share/zoneinfo/UTC"), b""),
        (entry("home/user/file", uid=1234), b"mine"),
        (entry("dev/null", tarfile.CHRTYPE, 0o666), b""),
    )
    disks._extract(archive, tree)
    assert stat.S_IMODE((tree / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tree / "bin/su").stat().st_mode) == 0o4755
    assert (tree / "bin/su-too").stat().st_ino == (tree / "bin/su").stat().st_ino
    assert os.readlink(tree / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert (tree / "home/user/file").stat().st_uid == 1234
    assert not (tree / "dev/null").exists()  # device nodes are the guest's /dev's business


def test_unpacking_refuses_members_that_would_leave_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"host")
    hostile: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {
        "dot-dot": [(entry("../outside/escaped"), b"x")],
        "through a symlink": [
            (entry("link", tarfile.SYMTYPE, link=str(outside)), b""),
            (entry("link/escaped"), b"x"),
        ],
        "hard link out": [(entry("stolen", tarfile.LNKTYPE, link="../outside/secret"), b"")],
        "hard link via symlink": [
            (entry("sym", tarfile.SYMTYPE, link=str(secret)), b""),
            (entry("stolen", tarfile.LNKTYPE, link="sym"), b""),
        ],
        "file over a directory": [(entry("d", tarfile.DIRTYPE, 0o755), b""), (entry("d"), b"x")],
    }
    for case, members in hostile.items():
        tree = tmp_path / case
        tree.mkdir()
        with pytest.raises(DiskError, match="unsafe member"):
            disks._extract(tar(*members), tree)
        assert sorted(p.name for p in outside.iterdir()) == ["secret"], case
        assert secret.read_bytes() == b"host", case
        assert not (tree / "stolen").exists(), case

    # A file over a symlink replaces the symlink; it is not written through it.
    tree = tmp_path / "replaced"
    tree.mkdir()
    disks._extract(tar((entry("x", tarfile.SYMTYPE, link=str(secret)), b""), (entry("x"), b"image's")), tree)
    assert secret.read_bytes() == b"host"
    assert not (tree / "x").is_symlink() and (tree / "x").read_bytes() == b"image's"


def test_a_hostile_export_fails_the_build_and_leaves_nothing(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unsafe member met while streaming stops the export and fails the build cleanly."""
    cache = tmp_path / "cache"
    real = disks._extract

    def hostile(stream: object, tree: Path) -> None:
        real(tar((entry("../escaped"), b"x")), tree)

    monkeypatch.setattr(disks, "_extract", hostile)
    with pytest.raises(DiskError, match=f"^image {image}: unsafe member '../escaped'"):
        disks.root_disk(image, cache)
    assert leftovers(cache) == [] and not (tmp_path / "escaped").exists()
    assert build_containers() == []


# -- workspace and layer -----------------------------------------------------------------------------


def test_make_workspace_makes_a_sparse_labelled_disk_any_user_can_write(tmp_path: Path) -> None:
    disk = tmp_path / "workspace.ext4"
    disks.make_workspace(disk)
    assert disk.stat().st_size == disks.WORKSPACE_SIZE
    # sparse, and its journal left unwritten (a new sparse file reads as zeros): not 33 MiB of it
    assert 0 < disks.disk_usage(disk) < 4 * MIB
    assert label(disk) == disks.LABEL_WORKSPACE
    root = debugfs(disk, "stat /")
    assert "Mode:  0777" in root and "User:     0" in root
    assert fsck_clean(disk)
    assert leftovers(tmp_path, keep=disk.name) == []


@pytest.mark.parametrize("existing", ["workspace", "other file"])
def test_make_workspace_never_overwrites(tmp_path: Path, existing: str) -> None:
    disk = tmp_path / "workspace.ext4"
    if existing == "workspace":
        disks.make_workspace(disk, 16 * MIB)
        debugfs_write(disk, "mkdir kept")
    else:
        disk.write_bytes(b"precious")
    before = (digest(disk), disk.stat().st_mtime_ns)
    with pytest.raises(DiskError, match="already exists"):
        disks.make_workspace(disk, 16 * MIB)
    assert (digest(disk), disk.stat().st_mtime_ns) == before
    assert leftovers(tmp_path, keep=disk.name) == []


def test_make_layer_makes_a_fresh_layer_even_over_one(tmp_path: Path) -> None:
    disk = tmp_path / "layer.ext4"
    disks.make_layer(disk, 32 * MIB)
    assert label(disk) == disks.LABEL_LAYER and disk.stat().st_size == 32 * MIB
    debugfs_write(disk, "mkdir old")
    assert "old" in debugfs(disk, "ls /")
    disks.make_layer(disk, 32 * MIB)
    assert "old" not in debugfs(disk, "ls /")
    assert label(disk) == disks.LABEL_LAYER and fsck_clean(disk)
    assert leftovers(tmp_path, keep=disk.name) == []


def test_make_disks_makes_both_at_once_and_never_a_workspace_over_one(tmp_path: Path) -> None:
    workspace, layer_disk = tmp_path / "workspace.ext4", tmp_path / "layer.ext4"
    disks.make_disks(workspace, layer_disk)
    assert label(workspace) == disks.LABEL_WORKSPACE and label(layer_disk) == disks.LABEL_LAYER
    assert fsck_clean(workspace) and fsck_clean(layer_disk)
    debugfs_write(workspace, "mkdir kept")
    debugfs_write(layer_disk, "mkdir old")
    disks.make_disks(workspace, layer_disk)  # a create worked again: the layer is fresh, the files stay
    assert "kept" in debugfs(workspace, "ls /") and "old" not in debugfs(layer_disk, "ls /")
    assert leftovers(tmp_path) == sorted([workspace.name, layer_disk.name])  # no temporary file left


def test_make_disks_fails_with_the_layers_error_once_both_are_done(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace.ext4"
    with pytest.raises(DiskError, match="layer"):
        disks.make_disks(workspace, tmp_path / "missing" / "layer.ext4")
    assert fsck_clean(workspace)  # made whole, not cut off by the layer's failure


# -- spares ------------------------------------------------------------------------------------------


def spares_of(directory: Path) -> list[str]:
    """The spares in ``directory``: whole disks of today's format and sizes, not what is being made."""
    return sorted(n for n in os.listdir(directory) if disks._spare_label(n)) if directory.exists() else []


def until_spares(directory: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while len(spares_of(directory)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return spares_of(directory)


def test_spares_are_made_whole_and_taken_once_each_as_a_new_disk_would_be(tmp_path: Path) -> None:
    spares = disks.Spares(tmp_path / "spares", count=2)
    assert spares.fill() == 4 and spares.fill() == 0  # two of each, then nothing more to make
    assert len(spares_of(spares.directory)) == 4 and len(os.listdir(spares.directory)) == 5  # and the lock

    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    workspace, layer_disk = sandbox / "workspace.ext4", sandbox / "layer.ext4"
    assert spares.take(disks.LABEL_WORKSPACE, workspace) and spares.take(disks.LABEL_LAYER, layer_disk)
    assert len(spares_of(spares.directory)) == 2  # moved out, not copied
    assert label(workspace) == disks.LABEL_WORKSPACE and label(layer_disk) == disks.LABEL_LAYER
    assert workspace.stat().st_size == disks.WORKSPACE_SIZE and layer_disk.stat().st_size == disks.LAYER_SIZE
    assert workspace.stat().st_nlink == 1 and 0 < disks.disk_usage(workspace) < 4 * MIB
    root = debugfs(workspace, "stat /")
    assert "Mode:  0777" in root and "User:     0" in root  # as make_workspace makes it
    assert fsck_clean(workspace) and fsck_clean(layer_disk)
    assert leftovers(sandbox) == sorted([workspace.name, layer_disk.name])

    # A workspace is never placed over another: the one there keeps its files.
    debugfs_write(workspace, "mkdir kept")
    before = digest(workspace)
    with pytest.raises(DiskError, match="already exists"):
        spares.take(disks.LABEL_WORKSPACE, workspace)
    assert digest(workspace) == before and leftovers(sandbox) == sorted([workspace.name, layer_disk.name])
    # A layer is: a fresh one replaces it.
    debugfs_write(layer_disk, "mkdir old")
    assert spares.take(disks.LABEL_LAYER, layer_disk) and "old" not in debugfs(layer_disk, "ls /")

    assert not spares.take(disks.LABEL_LAYER, sandbox / "another-layer.ext4")  # none left: the caller makes one
    assert not (sandbox / "another-layer.ext4").exists()


def test_spares_of_another_size_or_half_made_are_never_taken_and_a_fill_removes_them(tmp_path: Path) -> None:
    directory = tmp_path / "spares"
    directory.mkdir()
    size = disks.WORKSPACE_SIZE
    old = directory / f"{disks.LABEL_WORKSPACE}-v{disks.SPARE_FORMAT}-{16 * MIB}-0123456789abcdef.ext4"  # a size
    disks.make_workspace(old, 16 * MIB)
    unversioned = directory / f"{disks.LABEL_WORKSPACE}-{size}-0123456789abcdef.ext4"  # an older format's
    disks.make_workspace(unversioned, size)
    half = directory / f".{disks.LABEL_LAYER}-v{disks.SPARE_FORMAT}-{size}-0123456789abcdef.ext4.1234abcd.tmp"
    half.write_bytes(b"cut off")
    spares = disks.Spares(directory, count=1)
    assert not spares.take(disks.LABEL_WORKSPACE, tmp_path / "workspace.ext4")
    assert not spares.take(disks.LABEL_LAYER, tmp_path / "layer.ext4")
    assert spares.fill() == 2
    assert not old.exists() and not unversioned.exists() and not half.exists()
    assert sorted(os.listdir(directory)) == sorted([".lock", *spares_of(directory)]) and len(spares_of(directory)) == 2


def test_takers_at_once_never_get_the_same_spare(tmp_path: Path) -> None:
    spares = disks.Spares(tmp_path / "spares", count=3)
    spares.fill()
    barrier = threading.Barrier(6)
    taken: list[Path] = []

    def take(i: int) -> None:
        path = tmp_path / f"workspace-{i}.ext4"
        barrier.wait()
        if spares.take(disks.LABEL_WORKSPACE, path):
            taken.append(path)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 3  # each of the three spares once, the other takers none
    assert len({path.stat().st_ino for path in taken}) == 3
    assert len(spares_of(spares.directory)) == 3  # the layers, untouched


def test_the_filler_makes_spares_again_after_a_take_and_stops_when_closed(tmp_path: Path) -> None:
    spares = disks.Spares(tmp_path / "spares", count=1)
    spares.start()
    try:
        first = until_spares(spares.directory, 2)
        assert len(first) == 2
        assert spares.take(disks.LABEL_WORKSPACE, tmp_path / "workspace.ext4")
        again = until_spares(spares.directory, 2)
        assert len(again) == 2 and again != first  # made again
    finally:
        spares.close()
    assert spares._thread is not None
    spares._thread.join(10)
    assert not spares._thread.is_alive()


def test_make_disks_takes_spares_and_makes_what_none_is_at_hand_for(tmp_path: Path) -> None:
    spares = disks.Spares(tmp_path / "spares", count=1)
    spares.fill()
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    disks.make_disks(first / "workspace.ext4", first / "layer.ext4", spares)
    assert spares_of(spares.directory) == []  # both taken
    disks.make_disks(second / "workspace.ext4", second / "layer.ext4", spares)  # none left: made here
    for directory in (first, second):
        assert label(directory / "workspace.ext4") == disks.LABEL_WORKSPACE
        assert label(directory / "layer.ext4") == disks.LABEL_LAYER
        assert leftovers(directory) == ["layer.ext4", "workspace.ext4"]


@pytest.mark.parametrize("killed", ["before its link", "after its link"])
def test_make_disks_removes_what_a_take_killed_in_the_middle_left(tmp_path: Path, killed: str) -> None:
    """A take moves its spare beside the workspace, links it in place, removes the first name:
    a create worked again after its process died between two of these leaves neither, nor the
    half-made layer of a make that died."""
    workspace, layer_disk = tmp_path / "workspace.ext4", tmp_path / "layer.ext4"
    claim = tmp_path / ".workspace.ext4.0123abcd.spare"
    disks.make_workspace(claim, 16 * MIB)
    (tmp_path / ".layer.ext4.4567cdef.tmp").write_bytes(b"half made")
    if killed == "after its link":
        os.link(claim, workspace)
        debugfs_write(workspace, "mkdir kept")
    disks.make_disks(workspace, layer_disk, disks.Spares(tmp_path / "spares", count=0))
    assert leftovers(tmp_path) == ["layer.ext4", "workspace.ext4"]
    assert workspace.stat().st_nlink == 1 and label(workspace) == disks.LABEL_WORKSPACE
    assert ("kept" in debugfs(workspace, "ls /")) is (killed == "after its link")  # never made anew


# -- check -------------------------------------------------------------------------------------------


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.ext4"
    disks.make_layer(disk, 32 * MIB)
    debugfs_write(disk, f"write {__file__} file")
    return disk


def test_check_a_clean_disk(layer: Path) -> None:
    assert disks.check(layer) == ""


@pytest.mark.parametrize(
    "unclean",
    [
        ["ssv state 0"],  # not cleanly unmounted (a VM killed while it had the disk)
        ["ssv state 3"],  # an error recorded by the guest's kernel
        ["feature needs_recovery"],  # a journal to replay
        ["ssv error_count 1"],
        ["ssv max_mnt_count 2", "ssv mnt_count 2"],  # a check due by mounts
    ],
)
def test_check_reads_a_clean_superblock_itself_and_runs_e2fsck_on_any_other(
    layer: Path, unclean: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What e2fsck -p itself reads before it skips a disk: no e2fsck is run for a clean one.
    monkeypatch.setattr(disks, "E2FSCK", "/nonexistent/e2fsck")
    assert disks.check(layer) == ""
    debugfs_write(layer, *unclean)
    with pytest.raises(DiskError, match="/nonexistent/e2fsck is not installed"):
        disks.check(layer)


def test_check_mends_what_preen_may_and_says_what(layer: Path) -> None:
    debugfs_write(layer, "sif file links_count 5", "ssv state 0")  # and "not cleanly unmounted"
    assert not fsck_clean(layer)
    summary = disks.check(layer)
    assert "ref count is 5, should be 1" in summary and "\n" not in summary
    assert fsck_clean(layer)
    assert disks.check(layer) == ""


Corruption = Callable[[Path], None]


def clear_root_inode(disk: Path) -> None:
    debugfs_write(disk, "clri <2>", "ssv state 0")


def garbage_over_first_mib(disk: Path) -> None:
    with open(disk, "r+b") as file:
        file.write(os.urandom(MIB))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (clear_root_inode, r"exit 4\): .*UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY"),
        (garbage_over_first_mib, r"exit 8\): e2fsck: Bad magic number in super-block"),
    ],
)
def test_check_refuses_what_preen_may_not_mend_and_keeps_the_disk(
    layer: Path, corrupt: Corruption, message: str
) -> None:
    corrupt(layer)
    size = layer.stat().st_size
    with pytest.raises(DiskError, match=f"(?s)^disk {layer}: e2fsck -p failed \\({message}") as failed:
        disks.check(layer)
    assert len(str(failed.value).splitlines()) <= 8
    assert layer.is_file() and layer.stat().st_size == size


def test_check_refuses_what_is_no_filesystem(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a filesystem\n" * 1000)
    before = digest(text)
    with pytest.raises(DiskError, match="e2fsck -p failed \\(exit 8\\)"):
        disks.check(text)
    assert digest(text) == before

    missing = tmp_path / "missing.ext4"
    with pytest.raises(DiskError, match="No such file or directory"):
        disks.check(missing)
    assert not missing.exists()


def test_disk_usage_counts_what_is_allocated(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as file:
        file.truncate(64 * MIB)
    assert disks.disk_usage(sparse) == 0
    sparse.write_bytes(os.urandom(MIB))
    assert disks.disk_usage(sparse) >= MIB
    with pytest.raises(DiskError):
        disks.disk_usage(tmp_path / "missing")
