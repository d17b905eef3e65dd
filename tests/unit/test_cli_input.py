"""What the command line refuses before anything is sent: bad input is ``invalid_argument``
(exit 2), said in one line. No NATS listens at the configured address, so any attempt to send
would be ``unavailable``. The rest of the command line's refusals are
tests/integration/test_cli_input.py and tests/e2e/test_cli_input.py."""

from __future__ import annotations

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
    (("stop",), "stop needs at least one NAME, or --all"),
    (("stop", "a", "--all"), "give names or --all, not both"),
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
    (("lease", "acquire", "a", "--ttl", "0"), "--ttl must be more than 0 and at most 86400 seconds, not 0"),
    (("lease", "renew", "a", "--ttl", "2d"), "--ttl must be more than 0 and at most 86400 seconds, not 172800"),
    (("hold", "a", "--reason", "r" * 513), "--reason is longer than 512 characters"),
    (("top", "--interval", "nan"), "--interval must be more than 0"),
    (("exec", "a", "--timeout", "-1", "--", "true"), "--timeout must be more than 0"),
    (("frobnicate",), "argument cmd: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "reason"), REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
async def test_bad_input_is_invalid_argument_before_anything_is_sent(
    argv: tuple[str, ...], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No NATS listens at the configured address: any attempt to send would be ``unavailable``."""
    code, _, err = await CLI(NOBODY_LISTENS, capsys)(*argv)
    assert (code, err.count("\n")) == (2, 1), err
    assert err.startswith("sandboxctl: invalid_argument: ") and reason in err, err
