"""What the command line refuses before anything is sent: bad input is ``invalid_argument``
(exit 2), said in one line. No NATS listens at the configured address, so any attempt to send
would be ``unavailable``. The rest of the command line's refusals are
tests/integration/test_cli_input.py and tests/e2e/test_cli_input.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import free_port
from tests.conftest import CLI

NOBODY_LISTENS = Config(nats_url=f"nats://127.0.0.1:{free_port()}", data_dir=Path("/nonexistent"), actor="test")


REFUSED = [
    (("stop", "a", "--timeout", "-3"), "--timeout must be more than 0 and at most 86400 seconds, not -3"),
    (("stop", "a", "--timeout", "0"), "--timeout must be more than 0"),
    (("start", "a", "--timeout", "inf"), "--timeout must be more than 0 and at most 86400 seconds, not inf"),
    (("stop", "a", "--grace", "nan"), "--grace must be from 0 to 3600 seconds, not nan"),
    (("stop", "a", "--grace", "inf"), "--grace must be from 0 to 3600 seconds, not inf"),
    (("stop", "a", "--grace", "1e300"), "--grace must be from 0 to 3600 seconds, not 1e+300"),
    (("stop", "a", "--grace", "-1"), "--grace must be from 0 to 3600 seconds, not -1"),
    (("stop", "a", "--grace", "ten"), "argument --grace: invalid float value: 'ten'"),
    (("stop", "a", "a"), "sandbox a is named twice"),
    (("delete", "a", "b", "a"), "sandbox a is named twice"),
    (("stop",), "stop needs at least one NAME, --selector or --all"),
    (("stop", "a", "--all"), "give names, --all or --selector: one of them"),
    (("stop", "--all", "--selector", "a=b"), "give names, --all or --selector: one of them"),
    (("pause", "--selector", "bad key=b"), "label key 'bad key'"),
    (("stop", "a.b"), "invalid sandbox name 'a.b'"),
    (("get", "x" * 64), "invalid sandbox name"),
    (("list", "--phase", "Bogus"), "unknown phase 'Bogus'; phases are Provisioning, Ready, Stopping, Stopped"),
    (("list", "--label", "bad key=x"), "label key 'bad key'"),
    (("create", "a", "--image", "i", "--label", "k=" + "v" * 257), "label k: the value is longer than 256"),
    (("create", "a", "--image", "i", "--label", "k" * 129 + "=v"), "label key 'kkkk"),
    (("create", "a", "--image", "i", *(f"--label=k{i}=v" for i in range(65))), "65 labels: at most 64"),
    (("create", "a", "--image", "i", "--label", "k=1", "--label", "k=2"), "label k is given twice"),
    (("create", "a", "--image", "i", "--label", "novalue"), "label 'novalue' is not KEY=VALUE"),
    (("create", "a", "--image", "i", "--idle-timeout", "400d"), "--idle-timeout must be from 0 to 31622400"),
    (("create", "a", "--image", "i", "--auto-delete-after=-1d"), "--auto-delete-after: bad duration '-1d'"),
    (("create", "a", "--image", "i", "--auto-archive-after", "400d"), "--auto-archive-after must be from 0 to"),
    (("create", "a", "--image", "i", "--auto-archive-after", "soon"), "--auto-archive-after: bad duration 'soon'"),
    (("archive",), "archive needs at least one NAME, --selector or --all"),
    (("lease", "acquire", "a", "--ttl", "0"), "--ttl must be more than 0 and at most 86400 seconds, not 0"),
    (("lease", "renew", "a", "--ttl", "2d"), "--ttl must be more than 0 and at most 86400 seconds, not 172800"),
    (("hold", "a", "--reason", "r" * 513), "--reason is longer than 512 characters"),
    (("top", "--interval", "nan"), "--interval must be more than 0"),
    (("exec", "a", "--timeout", "-1", "--", "true"), "--timeout must be more than 0"),
    (("frobnicate",), "argument cmd: invalid choice: 'frobnicate'"),
    # resources, environment and expected versions (issue 17)
    (("create", "a", "--image", "i", "--cpus", "0"), "--cpus 0: must be more than 0 and at most 512"),
    (("create", "a", "--image", "i", "--cpus", "-1"), "--cpus -1: must be more than 0"),
    (("create", "a", "--image", "i", "--cpus", "nan"), "--cpus nan: must be more than 0"),
    (("create", "a", "--image", "i", "--cpus", "1e9"), "--cpus 1e9: must be more than 0 and at most 512"),
    (("create", "a", "--image", "i", "--cpus", "two"), "--cpus 'two': a number of CPUs"),
    (("create", "a", "--image", "i", "--memory", "4m"), "--memory 4m: must be from 6m (the engines' minimum)"),
    (("create", "a", "--image", "i", "--memory=-1g"), "--memory '-1g': a size such as 512m"),
    (("create", "a", "--image", "i", "--memory", "2p"), "--memory '2p': a size such as 512m"),
    (("create", "a", "--image", "i", "--memory", "9t"), "--memory 9t: must be from 6m (the engines' minimum) to 1t"),
    (("create", "a", "--image", "i", "--pids", "0"), "--pids 0: must be from 8 to 4194304"),
    (("create", "a", "--image", "i", "--pids", "1.5"), "--pids '1.5': a whole number"),
    (("create", "a", "--image", "i", "--env", "1A=x"), "--env: '1A' is not a variable name"),
    (("create", "a", "--image", "i", "--env", "A-B=x"), "--env: 'A-B' is not a variable name"),
    (("create", "a", "--image", "i", "--env", "=x"), "--env: '' is not a variable name"),
    (("create", "a", "--image", "i", "--env", "A=" + "v" * 4097), "the value of A is longer than 4096"),
    (("create", "a", "--image", "i", *(f"--env=K{i}=v" for i in range(129))), "129 environment variables"),
    (("create", "a", "--image", "i", "--env-file", "/nonexistent/env"), "--env-file /nonexistent/env: No such file"),
    (("stop", "a", "--if-seq", "x"), "--if-seq 'x': a log sequence, a whole number from 0"),
    (("stop", "a", "--if-seq", "-1"), "--if-seq '-1': a log sequence"),
    (("start", "a", "--if-seq", "1.5"), "--if-seq '1.5': a log sequence"),
    (("touch", "a", "--if-seq", "99999999999999999999"), "--if-seq '99999999999999999999'"),
    (("stop", "a", "b", "--if-seq", "3"), "--if-seq names one sandbox's log sequence: give one NAME"),
    (("delete", "--all", "--if-seq", "3"), "--if-seq names one sandbox's log sequence: give one NAME"),
    (
        ("update", "a"),
        "update needs something to change: --cpus, --memory, --pids, --label, --idle-timeout or --idle-action",
    ),
    (("update", "a", "--memory", "1k"), "--memory 1k: must be from 6m"),
    (("update", "a", "--label", "bad key-"), "label key 'bad key'"),
    (("update", "a", "--idle-timeout", "-1"), "--idle-timeout"),
    (("update", "a", "--if-seq", "x", "--label", "a=b"), "--if-seq 'x'"),
]


@pytest.mark.parametrize(("argv", "reason"), REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
async def test_bad_input_is_invalid_argument_before_anything_is_sent(
    argv: tuple[str, ...], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No NATS listens at the configured address: any attempt to send would be ``unavailable``."""
    code, _, err = await CLI(NOBODY_LISTENS, capsys)(*argv)
    assert (code, err.count("\n")) == (2, 1), err
    assert err.startswith("sandboxctl: invalid_argument: ") and reason in err, err


@pytest.mark.parametrize(
    ("setting", "value", "reason"),
    [
        ("SANDBOXCTL_NATS_URL", "nats://127.0.0.1:4222,127.0.0.1:4223", "NATS server URL '127.0.0.1:4223'"),
        ("SANDBOXCTL_NATS_URL", "nats://127.0.0.1:99999", "'nats://127.0.0.1:99999' has a port that is not"),
        ("SANDBOXCTL_NATS_URL", " , ", "no NATS server URL given"),
        ("SANDBOXCTL_RECONCILE_EXITED", "bogus", "SANDBOXCTL_RECONCILE_EXITED must be restart or error"),
    ],
)
def test_a_bad_setting_in_the_environment_is_one_line_and_invalid_argument(
    setting: str, value: str, reason: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandboxctl.cli.main import run_main

    monkeypatch.setenv(setting, value)
    code = asyncio.run(run_main(["list"]))
    err = capsys.readouterr().err
    assert (code, err.count("\n")) == (2, 1), err
    assert err.startswith("sandboxctl: invalid_argument: ") and reason in err, err


def test_an_env_file_is_read_as_docker_reads_it(tmp_path: Path) -> None:
    from sandboxctl.cli.spec import environment

    file = tmp_path / "env"
    file.write_text("# settings\n\nGREETING=hello world\nURL=http://x/?a=b\nFROM_OUTSIDE\nMISSING\n  SPACED=1\n")
    env = environment(["GREETING=hi", "B="], [str(file)], outside={"FROM_OUTSIDE": "o"})
    assert env == {"GREETING": "hi", "URL": "http://x/?a=b", "FROM_OUTSIDE": "o", "SPACED": "1", "B": ""}
    bad = tmp_path / "bad"
    bad.write_text("OK=1\n2BAD=x\n")
    with pytest.raises(ValueError, match=r"--env-file .*bad:2: '2BAD' is not a variable name"):
        environment([], [str(bad)], outside={})
    binary = tmp_path / "binary"
    binary.write_bytes(b"A=\xff\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        environment([], [str(binary)], outside={})


def test_sizes_are_read_in_units_of_1024_as_docker_reads_them() -> None:
    from sandboxctl.cli.spec import memory

    assert memory("512m") == 512 * 2**20
    assert memory("1.5g") == 3 * 2**29
    assert memory("64MiB") == memory("64mb") == memory("64M") == 64 * 2**20
    assert memory("67108864") == 64 * 2**20
