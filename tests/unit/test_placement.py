"""Placement (statemachine/placement.py): the host with the most room among those that fit, in
proportion to capacity, and a refusal that says why each host did not fit; and the bounds of
what a host announces and a create asks of one."""

from __future__ import annotations

import random
import re
from collections import Counter

import msgspec
import pytest

from sandboxctl.events.commands import BulkSandboxes, CreateSandbox, command_decoder
from sandboxctl.events.hosts import HostAnnouncement, decode_host, encode_host
from sandboxctl.events.lifecycle import SandboxFailed
from sandboxctl.events.replies import ErrorCode
from sandboxctl.events.spec import Resources
from sandboxctl.runtime.config import Config
from sandboxctl.statemachine import Phase, Rejection, SandboxState
from sandboxctl.statemachine.bulk import selected
from sandboxctl.statemachine.placement import HOST_LOST, Candidate, Loads, Placer, foreign_report, host_lost, place

NONE = Resources()


def host(name: str, max_sandboxes: int = 10, engines: tuple[str, ...] = ("podman",), **kw: object) -> Candidate:
    return Candidate(
        name=name,
        engines=engines,
        labels=kw.pop("labels", {}),  # type: ignore[arg-type]
        max_sandboxes=max_sandboxes,
        cpus=kw.pop("cpus", 4.0),  # type: ignore[arg-type]
        memory=kw.pop("memory", 8 << 30),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def placed(loads: Loads, name: str, on: str, resources: Resources = NONE) -> SandboxState:
    state = SandboxState(name=name, sandbox_id=name, phase=Phase.READY, driver="podman", host=on, resources=resources)
    loads.changed(None, state)
    return state


def test_hosts_fill_in_proportion_to_their_capacity() -> None:
    hosts = [host("a", 200), host("b", 100)]
    loads = Loads()
    split: Counter[str] = Counter()
    for i in range(200):
        chosen = place(hosts, loads, "podman", NONE)
        assert isinstance(chosen, str)
        placed(loads, f"s{i}", chosen)
        split[chosen] += 1
    assert abs(split["a"] - 2 * split["b"]) <= 2, split


def test_only_a_host_with_the_engine_the_name_and_the_labels_asked_for_is_chosen() -> None:
    hosts = [
        host("a", engines=("docker",), labels={"zone": "a"}),
        host("b", labels={"zone": "b"}),
        host("c", labels={"zone": "a", "gpu": "none"}),
    ]
    loads = Loads()
    assert place(hosts, loads, "podman", NONE, constraints={"zone": "a"}) == "c"
    assert place(hosts, loads, "docker", NONE) == "a"
    assert place(hosts, loads, "podman", NONE, host="b") == "b"
    refused = place(hosts, loads, "podman", NONE, constraints={"zone": "z"})
    assert isinstance(refused, Rejection) and refused.code == ErrorCode.FAILED_PRECONDITION
    assert "zone=z" in refused.message and "a: has no podman" in refused.message


def test_a_full_draining_or_lost_host_is_passed_by_and_the_refusal_says_so() -> None:
    loads = Loads()
    hosts = [host("full", 1), host("drained", draining=True), host("gone", live=False)]
    placed(loads, "x", "full")
    refused = place(hosts, loads, "podman", NONE)
    assert isinstance(refused, Rejection)
    assert "full: full (1 of 1 sandboxes)" in refused.message
    assert "drained: draining" in refused.message and "gone: lost" in refused.message


def test_an_unknown_host_and_no_host_at_all_are_refused() -> None:
    unknown = place([host("a")], Loads(), "podman", NONE, host="zz")
    assert isinstance(unknown, Rejection) and unknown.message == "no host zz is announced"
    nothing = place([], Loads(), "podman", NONE)
    assert isinstance(nothing, Rejection) and nothing.code == ErrorCode.FAILED_PRECONDITION


def test_cpu_and_memory_limits_count_against_a_hosts_capacity() -> None:
    loads = Loads()
    hosts = [host("small", cpus=2.0), host("big", cpus=8.0)]
    assert place(hosts, loads, "podman", Resources(cpus=4.0)) == "big"
    placed(loads, "x", "big", Resources(cpus=7.0))
    refused = place(hosts, loads, "podman", Resources(cpus=4.0))
    assert isinstance(refused, Rejection) and "CPUs free" in refused.message


def test_a_deleted_sandbox_frees_its_place() -> None:
    loads = Loads()
    state = placed(loads, "x", "a")
    assert place([host("a", 1)], loads, "podman", NONE) != "a"
    loads.changed(state, SandboxState(name="x", sandbox_id="x", phase=Phase.DELETED, driver="podman", host="a"))
    assert place([host("a", 1)], loads, "podman", NONE) == "a"


def test_a_lost_host_fails_what_runs_or_moves_there_and_leaves_the_rest() -> None:
    def on(phase: Phase, host_name: str = "a") -> SandboxState:
        return SandboxState(name="x", sandbox_id="x", phase=phase, driver="podman", host=host_name)

    for phase in (Phase.READY, Phase.STOPPING, Phase.STARTING, Phase.PROVISIONING, Phase.PAUSED):
        (failed,) = host_lost(on(phase), "a", 31.0)
        assert isinstance(failed, SandboxFailed) and failed.kind == HOST_LOST
        assert failed.reason.startswith("host_lost") and "31 s" in failed.reason
    for phase in (Phase.STOPPED, Phase.ERROR, Phase.ARCHIVED, Phase.COMPLETED, Phase.DELETED):
        assert host_lost(on(phase), "a", 31.0) == []
    assert host_lost(on(Phase.READY, "b"), "a", 31.0) == []
    assert host_lost(None, "a", 31.0) == []


def test_a_bulk_command_with_a_host_takes_in_that_hosts_sandboxes_only() -> None:
    bulk = BulkSandboxes(command_id="c1", verb="stop", all=True, host="a")
    assert selected(SandboxState(name="x", sandbox_id="x", phase=Phase.READY, driver="podman", host="a"), bulk)
    assert not selected(SandboxState(name="y", sandbox_id="y", phase=Phase.READY, driver="podman", host="b"), bulk)


def test_the_loads_know_which_sandboxes_are_on_each_host() -> None:
    loads = Loads()
    state = placed(loads, "x", "a")
    placed(loads, "y", "a")
    assert loads.names == {"a": {"x", "y"}}
    moved = SandboxState(name="x", sandbox_id="x", phase=Phase.DELETED, driver="podman", host="a")
    loads.changed(state, moved)
    assert loads.names == {"a": {"y"}} and loads.of("a").sandboxes == 1


def test_creates_placed_at_once_see_each_others_reservations() -> None:
    hosts = [host("a", 200), host("b", 100)]
    loads = Loads()
    split: Counter[str] = Counter()
    for _ in range(150):  # none folded yet: each only reserved
        chosen = place(hosts, loads, "podman", NONE)
        assert isinstance(chosen, str)
        loads.reserve(chosen, NONE)
        split[chosen] += 1
    assert split == {"a": 100, "b": 50}
    for name, count in split.items():
        for _ in range(count):
            loads.release(name, NONE)
    assert loads.reserved == {} and loads.of("a").sandboxes == 0


def test_the_index_places_as_the_scan_does_whatever_the_hosts_and_loads_do() -> None:
    rng = random.Random(19)
    lost: set[str] = set()
    placer = Placer(live=lambda name: name not in lost)
    states: dict[str, SandboxState] = {}
    for step in range(3000):
        roll = rng.random()
        name = f"h{rng.randrange(12)}"
        if roll < 0.08:  # a host announced, renewed with other capacity, drained or undrained
            placer.announce(
                name, host(name, rng.randrange(1, 30), engines=rng.choice([("podman",), ("podman", "docker")]),
                           draining=rng.random() < 0.2)
            )  # fmt: skip
        elif roll < 0.1:
            placer.announce(name, None)
        elif roll < 0.13:
            lost.symmetric_difference_update({name})
            placer.announce(name, placer.hosts.get(name))  # what a heartbeat (or its lapse) tells
        elif roll < 0.3 and states:
            gone = states.pop(rng.choice(sorted(states)))
            placer.loads.changed(gone, msgspec.structs.replace(gone, phase=Phase.DELETED))
        else:
            scanned = placer.scan("podman", NONE)
            indexed = placer.place("podman", NONE)
            assert indexed == scanned, (step, indexed, scanned)
            if isinstance(indexed, str):
                state = placed(placer.loads, f"s{step}", indexed)
                states[state.name] = state


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"SANDBOXCTL_HOST": "a.b"}, "SANDBOXCTL_HOST 'a.b'"),
        ({"SANDBOXCTL_HOST": "x" * 64}, "SANDBOXCTL_HOST"),
        ({"SANDBOXCTL_HOST_LABELS": "zone"}, "SANDBOXCTL_HOST_LABELS: label 'zone' is not KEY=VALUE"),
        ({"SANDBOXCTL_HOST_MEMORY": "lots"}, "SANDBOXCTL_HOST_MEMORY 'lots'"),
        ({"SANDBOXCTL_HOST_MEMORY": "1k"}, "SANDBOXCTL_HOST_MEMORY must be from"),
        ({"SANDBOXCTL_HOST_CPUS": "nan"}, "SANDBOXCTL_HOST_CPUS must be a number of CPUs above 0"),
        ({"SANDBOXCTL_HOST_MAX_SANDBOXES": "0"}, "SANDBOXCTL_HOST_MAX_SANDBOXES must be a whole number"),
        ({"SANDBOXCTL_HOST_HEARTBEAT": "0.5"}, "SANDBOXCTL_HOST_HEARTBEAT must be from 1s"),
    ],
)
def test_a_host_setting_out_of_bounds_is_refused_with_its_name(env: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        Config.from_env(env)


@pytest.mark.parametrize("host", ["a.b", "a*", ">", "-x", "x" * 64])
def test_a_create_naming_a_host_that_is_no_subject_token_is_refused_by_the_contract(host: str) -> None:
    create = CreateSandbox(name="s", command_id="c", image="img", host=host)
    with pytest.raises(msgspec.ValidationError):
        command_decoder.decode(msgspec.json.encode(create))


def test_an_announcement_out_of_bounds_or_naming_an_engine_twice_is_no_host() -> None:
    good = HostAnnouncement(name="a", worker="w", engines=["podman"], cpus=2, memory=1 << 30, max_sandboxes=10)
    assert decode_host(encode_host(good)) == good
    for bad in (
        msgspec.structs.replace(good, engines=["podman", "podman"]),
        msgspec.structs.replace(good, engines=[]),
        msgspec.structs.replace(good, cpus=float("inf")),
        msgspec.structs.replace(good, max_sandboxes=0),
        msgspec.structs.replace(good, name="a.b"),
        msgspec.structs.replace(good, heartbeat=0.1),
    ):
        with pytest.raises(msgspec.ValidationError):
            decode_host(encode_host(bad))


@pytest.mark.parametrize(
    ("on", "reporter", "adopter", "believed"),
    [
        ("host-a", "host-a", None, True),  # its own host's worker
        ("host-a", "host-b", None, False),  # another host's worker
        ("host-a", None, None, False),  # a worker of no host, about a placed sandbox
        ("", None, None, True),  # before hosts: the worker of no host
        ("", "host-a", "host-a", True),  # placed on no host: the host that adopted those
        ("", "host-b", "host-a", False),  # ... and no other
        ("", "host-b", None, True),  # no host has adopted them (a plane that places nothing)
    ],
)
def test_only_a_sandboxs_own_host_speaks_for_it(
    on: str, reporter: str | None, adopter: str | None, believed: bool
) -> None:
    state = SandboxState(name="s", sandbox_id="s", phase=Phase.READY, driver="podman", host=on)
    why = foreign_report(state, reporter, adopter)
    assert (why == "") is believed, why
    assert foreign_report(None, reporter, adopter) == ""  # no sandbox: nothing to believe
