"""What makes an engine object a sandbox's, without an engine: its sandbox id label, and nothing
else. The drivers acting on that rule on real podman and docker are tests/e2e/test_engine_ownership.py."""

from __future__ import annotations

import pytest

from sandboxctl.drivers.base import SANDBOX_ID, ContainerMissing, DriverError, engine_failure, owned_by, tell_launched


def test_only_the_sandbox_id_label_makes_an_object_the_sandboxs() -> None:
    assert owned_by({SANDBOX_ID: "a"}, "a")
    assert not owned_by({SANDBOX_ID: "b"}, "a")
    assert not owned_by({}, "a") and not owned_by(None, "a")  # made by hand: nobody's to touch
    assert not owned_by({SANDBOX_ID: "a"}, "")  # a caller that does not say whose it acts for acts on nothing


def test_what_the_engines_say_of_a_container_they_have_not_is_missing_whatever_the_status() -> None:
    """A listing that names a container whose store record is gone (podman answers 500 "container
    not known") must pass it by as gone, not fail the whole reconciliation."""
    for message in (
        "No such container: sandboxctl-x",
        "no such volume: sandboxctl-x-workspace",
        'getting container from store "f6b7bf": container not known',
    ):
        assert isinstance(engine_failure("list", RuntimeError(message), message), ContainerMissing)
    other = engine_failure("list", RuntimeError("permission denied"), "permission denied")
    assert isinstance(other, DriverError) and not isinstance(other, ContainerMissing)


def test_a_start_goes_on_whatever_its_launched_callback_does(caplog: pytest.LogCaptureFixture) -> None:
    """The caller's callback runs on the driver's thread in the middle of a start: its failure
    (the caller's loop gone, say) is logged, never the start's."""
    calls: list[str] = []

    def failing() -> None:
        calls.append("called")
        raise RuntimeError("Event loop is closed")

    tell_launched(failing)
    tell_launched(None)
    assert calls == ["called"] and "launched callback failed" in caplog.text
