"""The built distribution installs one import name, ``sandboxctl``, so a service that embeds the
SDK and has packages of its own called ``services`` or ``events`` can install it beside them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def test_the_wheel_adds_only_sandboxctl_and_lives_beside_a_services_package_of_someone_else(tmp_path: Path) -> None:
    # Built from a copy: pip builds in the source tree and would leave build/ in the checkout.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,  # sandboxctl/<room> are links to the room folders, as in the checkout
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*_cache", "tests", "bench", "docs"
        ),
    )
    built = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(built), str(source)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = built.glob("sandboxctl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        assert tops == {"sandboxctl"}, tops
        assert "sandboxctl/py.typed" in names  # services that use the SDK get its types
        assert {"sandboxctl/cli/console.js", "sandboxctl/cli/console.css"} <= set(names)  # the web console's
        fresh = tmp_path / "fresh"
        venv.EnvBuilder(with_pip=False).create(fresh)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(fresh), "platbase": str(fresh)}))
        archive.extractall(site)  # a pure wheel, installed as pip would lay it out
    theirs = tmp_path / "theirs"
    (theirs / "services").mkdir(parents=True)
    (theirs / "services" / "__init__.py").write_text("WHOSE = 'theirs'\n")
    (theirs / "events").mkdir()
    (theirs / "events" / "__init__.py").write_text("WHOSE = 'theirs'\n")
    # sandboxctl's dependencies from this venv, without its .pth files (the editable install's
    # finder would otherwise bring the checkout back).
    deps = sysconfig.get_path("purelib")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(theirs), deps])}
    check = (
        "import services, events, sandboxctl.events, sandboxctl.client, sandboxctl.cli.main\n"
        "assert services.WHOSE == events.WHOSE == 'theirs'\n"
        f"assert sandboxctl.client.__file__.startswith({str(site)!r}), sandboxctl.client.__file__\n"
        "from sandboxctl.client import SandboxClient\n"
        "print('ok')\n"
    )
    python = fresh / "bin" / "python"
    done = subprocess.run([str(python), "-c", check], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
