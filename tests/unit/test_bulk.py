"""Which sandboxes a bulk command takes in, and the command each gets (statemachine/bulk.py)."""

from __future__ import annotations

import msgspec

from sandboxctl.events.commands import BulkSandboxes, DeleteSandbox, StopSandbox
from sandboxctl.statemachine import Phase, SandboxState
from sandboxctl.statemachine.bulk import bulk_problem, command_for, selected


def box(name: str, phase: Phase, **labels: str) -> SandboxState:
    return SandboxState(name=name, sandbox_id="id", phase=phase, driver="podman", labels=labels)


def test_a_selector_takes_in_sandboxes_with_every_label_in_a_phase_the_verb_is_for() -> None:
    stop = BulkSandboxes(command_id="b", verb="stop", selector={"team": "red", "tier": "a"})
    assert selected(box("a", Phase.READY, team="red", tier="a", x="y"), stop)
    assert selected(box("b", Phase.PAUSED, team="red", tier="a"), stop)
    assert not selected(box("c", Phase.READY, team="red"), stop)  # one label missing
    assert not selected(box("d", Phase.READY, team="blue", tier="a"), stop)
    assert not selected(box("e", Phase.STOPPED, team="red", tier="a"), stop)  # nothing to stop
    start = BulkSandboxes(command_id="b", verb="start", all=True)
    assert selected(box("f", Phase.ERROR), start) and not selected(box("g", Phase.COMPLETED), start)
    delete = BulkSandboxes(command_id="b", verb="delete", all=True)
    assert selected(box("h", Phase.PROVISIONING), delete) and not selected(box("i", Phase.DELETED), delete)


def test_a_bulk_command_names_a_selector_or_all_and_each_sandbox_gets_an_id_of_its_own() -> None:
    assert bulk_problem(BulkSandboxes(command_id="b", verb="stop")) is not None
    assert bulk_problem(BulkSandboxes(command_id="b", verb="stop", all=True, selector={"a": "b"})) is not None
    assert bulk_problem(BulkSandboxes(command_id="b", verb="stop", all=True)) is None
    bulk = BulkSandboxes(command_id="b-1", verb="stop", all=True, timeout=3.0, reason="r", actor="al")
    one, two = command_for(bulk, "one"), command_for(bulk, "two")
    assert isinstance(one, StopSandbox) and one.timeout == 3.0 and one.reason == "r" and one.actor == "al"
    assert one.command_id != two.command_id and one.correlation_id == two.correlation_id == "b-1"
    assert command_for(bulk, "one") == one  # the same bulk command gives the same id: a retry acts once
    other = command_for(msgspec.structs.replace(bulk, command_id="b-2"), "one")
    assert other.command_id != one.command_id
    assert isinstance(command_for(msgspec.structs.replace(bulk, verb="delete"), "one"), DeleteSandbox)
