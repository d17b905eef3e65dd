"""The unit layer starts nothing: no nats-server, no podman service, no docker daemon. The fixtures
that would are refused at collection (tests/conftest.py); this refuses the parts themselves, for a
test that would start one on its own."""

from __future__ import annotations

from typing import NoReturn

import pytest

import sandboxctl.runtime.embedded
from testing.dockerd import DockerDaemon


@pytest.fixture(autouse=True)
def _starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("a unit test starts no server and no engine: put it in tests/integration or tests/e2e")

    embedded = sandboxctl.runtime.embedded
    for part in (embedded.NatsServer, embedded.PodmanService, DockerDaemon):
        monkeypatch.setattr(part, "start", refused)
    monkeypatch.setattr(embedded, "nats_server_binary", refused)
