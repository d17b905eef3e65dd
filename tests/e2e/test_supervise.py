"""Supervision of the services in a process, against a real nats-server and podman: a
service whose task dies is logged with its exception, replaced by a new instance that
recovers from the log and its own store, and the others are left alone. A service that keeps
dying is tests/integration/test_supervise.py."""

from __future__ import annotations

import logging

import pytest

from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ControlPlane
from tests.integration.test_supervise import INJECTED, break_projection


async def test_a_projector_whose_database_fails_is_restarted_and_catches_up(
    podman_config: Config, names, image: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failed = break_projection(monkeypatch, failures=1)
    plane = await ControlPlane(podman_config).start()
    client = await SandboxClient.connect(podman_config.nats_url, actor="test")
    try:
        first = plane.projector
        name = names.new()
        with caplog.at_level(logging.INFO, logger="sandboxctl.runtime.supervise"):
            reply = await client.create(name, image)
            # the create's events fail the first write; the projector is replaced, refolds the log
            # from its checkpoint, and the waiter sees the sandbox Ready
            item = await client.wait_for(name, "Ready", reply.seq, timeout=60)
        assert failed() == 1 and item["phase"] == "Ready"
        assert plane.projector is not first and all(t.done() for t in first.tasks)
        slot = next(s for s in plane.supervisor.slots if s.name == "projector")
        assert slot.restarts == 1 and slot.state == "ok"
        messages = [r.getMessage() for r in caplog.records]
        failure = next(r for r in caplog.records if r.getMessage().startswith("projector failed"))
        assert INJECTED in failure.getMessage() and failure.exc_info is not None  # with its exception
        assert any(m.startswith("projector is back") for m in messages), messages
        info = await plane.statemachine.js.stream_info(subjects.LOG_STREAM)
        assert plane.projector.position == info.state.last_seq  # caught up with the whole log
        # the other services were left alone
        assert all(s.restarts == 0 for s in plane.supervisor.slots if s.name != "projector")
    finally:
        await client.close()
        await plane.stop()
