"""The metrics' own rules: labels of bounded sets only, durations that are durations, the
address setting checked before anything starts."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from sandboxctl.events.replies import ErrorCode
from sandboxctl.observe import metrics
from sandboxctl.observe.address import parse_address
from sandboxctl.statemachine import Phase


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_command_s_verb_label_is_a_known_verb_or_unknown() -> None:
    """A subject is whatever its sender made it: each made-up verb must not become a series."""
    assert metrics.verb_of("sandboxctl.cmd.stop") == "stop"
    assert metrics.verb_of("sandboxctl.cmd.bulk.alice") == "bulk"
    assert metrics.verb_of("sandboxctl.cmd.x" + "y" * 200) == "unknown"
    assert metrics.verb_of("sandboxctl") == "unknown"
    assert metrics.outcome_of(None) == "accepted"
    assert metrics.outcome_of(ErrorCode.NOT_FOUND) == "not_found"


def test_only_the_time_in_a_transient_phase_is_a_transition_and_only_a_sane_one() -> None:
    labels = {"from_phase": "Stopping", "to_phase": "Stopped", "driver": "unit"}
    before = sample("sandboxctl_transition_seconds_count", **labels)
    metrics.observe_transition(Phase.STOPPING, Phase.STOPPED, "unit", 0.25)
    metrics.observe_transition(Phase.STOPPING, Phase.STOPPED, "unit", -1.0)  # clocks disagree: not a duration
    metrics.observe_transition(Phase.STOPPING, Phase.STOPPED, "unit", math.nan)
    metrics.observe_transition(Phase.READY, Phase.STOPPING, "unit", 5.0)  # Ready is no wait: not counted
    assert sample("sandboxctl_transition_seconds_count", **labels) == before + 1
    assert sample("sandboxctl_transition_seconds_count", from_phase="Ready", to_phase="Stopping", driver="unit") == 0


def test_dead_letters_are_counted_by_the_consumer_that_gave_up_and_drop_to_zero() -> None:
    metrics.set_dead_letters(
        {
            "sandboxctl.deadletter.unit-a.s1": 2,
            "sandboxctl.deadletter.unit-a.s2": 1,
            "sandboxctl.deadletter.unit-b.s1": 4,
        }
    )
    assert sample("sandboxctl_dead_letters", consumer="unit-a") == 3
    assert sample("sandboxctl_dead_letters", consumer="unit-b") == 4
    metrics.set_dead_letters({"sandboxctl.deadletter.unit-b.s1": 1})
    assert sample("sandboxctl_dead_letters", consumer="unit-a") == 0
    assert sample("sandboxctl_dead_letters", consumer="unit-b") == 1


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("0.0.0.0:9464", ("0.0.0.0", 9464)), ("[::1]:9464", ("::1", 9464)),
     ("off", None), (" OFF ", None)],
)  # fmt: skip
def test_the_metrics_address_is_host_and_port_or_off(text: str, parsed: tuple[str, int] | None) -> None:
    assert parse_address(text) == parsed


@pytest.mark.parametrize("text", ["", "9464", ":9464", "localhost:", "localhost:99999", "localhost:http", "a:1:x"])
def test_anything_else_is_refused_saying_what_to_give(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_address(text)
