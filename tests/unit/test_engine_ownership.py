"""What makes an engine object a sandbox's, without an engine: its sandbox id label, and nothing
else. The drivers acting on that rule on real podman and docker are tests/e2e/test_engine_ownership.py."""

from __future__ import annotations

from sandboxctl.drivers.base import SANDBOX_ID, owned_by


def test_only_the_sandbox_id_label_makes_an_object_the_sandboxs() -> None:
    assert owned_by({SANDBOX_ID: "a"}, "a")
    assert not owned_by({SANDBOX_ID: "b"}, "a")
    assert not owned_by({}, "a") and not owned_by(None, "a")  # made by hand: nobody's to touch
    assert not owned_by({SANDBOX_ID: "a"}, "")  # a caller that does not say whose it acts for acts on nothing
