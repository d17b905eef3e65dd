"""Several state-machine instances against one log, each on its own connection, as replicas in
their own processes would be: commands go to all of them at once and two racing commands never
both win (the sequence guard refuses the loser, which decides again); facts are applied by one
instance at a time (the facts consumer is pinned), in the drivers' order, and another instance
takes over at once when that one goes. A real nats-server; no engine is needed to decide: the
test publishes the drivers' facts itself."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from sandboxctl.bus import eventlog, snapshots, streams
from sandboxctl.bus.eventlog import publish_fact
from sandboxctl.bus.reading import history
from sandboxctl.bus.servers import server_urls
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.events.envelope import Envelope, new_id, now, type_name
from sandboxctl.events.facts import ContainerStarted, Fact
from sandboxctl.events.replies import ErrorCode, Reply, error_reply
from sandboxctl.runtime.embedded import NatsServer
from sandboxctl.services import statemachine
from sandboxctl.services.statemachine import FACTS_ACK_WAIT, FACTS_CONSUMER, FACTS_PIN_TIMEOUT, StateMachineService
from sandboxctl.statemachine import Phase
from testing.hosts import announce_host
from tests.conftest import until
from tests.integration.test_idempotency import send
from tests.integration.test_replicas import jetstream_answers, nodes_of


@pytest.fixture
async def machines(nats_server: NatsServer) -> AsyncIterator[list[StateMachineService]]:
    started: list[StateMachineService] = []
    for _ in range(2):
        service = StateMachineService(await nats.connect(nats_server.url), drivers=("podman",))
        await service.start()
        started.append(service)
    yield started
    for service in started:
        await service.stop()
        await service.nc.close()


async def report(nc: NATS, name: str, fact: Fact) -> None:
    """What a driver worker would report about sandbox ``name``."""
    envelope = Envelope(
        id=new_id(), type=type_name(type(fact)), source="test/driver", subject=name, time=now(), data=fact
    )
    await publish_fact(nc.jetstream(), envelope)


def sandbox_id(machines: list[StateMachineService], name: str) -> str:
    return next(m.states[name].sandbox_id for m in machines if name in m.states)


async def test_racing_commands_on_two_instances_never_both_win_and_every_log_folds(
    nc: NATS, machines: list[StateMachineService]
) -> None:
    names = [f"race-{i}" for i in range(30)]
    # Every create is sent twice at once, under two command ids: the two instances take them.
    creates = await asyncio.gather(
        *(send(nc, "create", name=name, command_id=f"{name}-{twin}") for name in names for twin in "ab")
    )
    for name in names:
        won = [r for r in creates if r.sandbox == name and r.accepted and r.appended]
        assert len(won) == 1, [r for r in creates if r.sandbox == name]
    for name in names:
        await report(
            nc, name, ContainerStarted(sandbox_id=sandbox_id(machines, name), incarnation="2026-12-01T00:00:01Z")
        )
    for name in names:
        await until(lambda name=name: all(m.states[name].phase is Phase.READY for m in machines), f"{name} Ready")
    # Then a stop, a touch and a second stop of each at once: one stop is appended, never two.
    racing: list[Reply] = await asyncio.gather(
        *(
            send(nc, verb, name=name, command_id=f"{name}-{verb}-{i}")
            for name in names
            for i, verb in enumerate(("stop", "touch", "stop"))
        )
    )
    assert all(r.error is None or r.error.code in ("failed_precondition",) for r in racing), racing
    for name in names:
        events = await history(nc.jetstream(), name)
        kinds = [e["type"].split(".")[2] for e in events]
        assert kinds.count("created") == 1 and kinds.count("stop_requested") == 1, kinds
        # and it folds with nothing skipped: no event was appended on a stale state
        assert not [e for e in events if e.get("error")], events
    print(f"\nsequence-guard refusals: {[m.conflicts for m in machines]} for {len(creates) + len(racing)} commands")


@pytest.mark.parametrize("goes", ["stops", "dies", "dies holding a fact"])
async def test_one_instance_applies_the_facts_and_another_takes_over_when_it_goes(
    nc: NATS, machines: list[StateMachineService], goes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance that stops gives up its pin, and another applies the next facts at once; one
    that dies (its connection closes, nothing given up) loses it once it has not asked for facts
    for FACTS_PIN_TIMEOUT seconds, and the facts it was given and never acknowledged come to the
    other FACTS_ACK_WAIT after they were given."""
    names = [f"pin-{i}" for i in range(6)]
    for name in names:
        assert (await send(nc, "create", name=name, command_id=f"c-{name}")).accepted
    started = ContainerStarted(incarnation="2026-12-01T00:00:01Z")
    for name in names[:3]:
        started.sandbox_id = sandbox_id(machines, name)
        await report(nc, name, started)
    for name in names[:3]:
        await until(lambda name=name: machines[0].states[name].phase is Phase.READY, f"{name} Ready")
    # one instance holds the pin and applied all three; the other stood by
    assert sorted(m.applies_facts for m in machines) == [False, True]
    pinned = next(m for m in machines if m.applies_facts)
    other = next(m for m in machines if not m.applies_facts)
    assert pinned.facts_applied == 3 and other.facts_applied == 0
    before = await nc.jetstream().consumer_info(subjects.FACTS_STREAM, FACTS_CONSUMER)
    if goes == "dies holding a fact":

        async def die(msgs: list[Any]) -> None:  # given facts, it dies before it acknowledges them
            await pinned.nc.close()

        monkeypatch.setattr(pinned, "_apply_facts", die)
    else:
        if goes == "dies":
            await pinned.nc.close()
        await pinned.stop()
        await pinned.nc.close()
    gone = time.monotonic()
    for name in names[3:]:
        started.sandbox_id = sandbox_id(machines, name)
        await report(nc, name, started)
    if goes == "dies holding a fact":
        await until(lambda: pinned.nc.is_closed, "the pinned instance given a fact and gone")
        await pinned.stop()
    machines.remove(pinned)
    try:
        for name in names[3:]:
            await until(
                lambda name=name: other.states[name].phase is Phase.READY,
                f"{name} Ready",
                timeout=FACTS_PIN_TIMEOUT + FACTS_ACK_WAIT + 5.0,
            )
    except AssertionError as exc:
        # Say where the facts are: delivered to the instance that went and waiting out their ack
        # wait (ack pending), or never delivered (pending), so a failure under load tells why.
        info = await nc.jetstream().consumer_info(subjects.FACTS_STREAM, FACTS_CONSUMER)
        raise AssertionError(
            f"{exc}; facts consumer: ack pending {info.num_ack_pending}, pending {info.num_pending}, "
            f"waiting {info.num_waiting}, redelivered {info.num_redelivered}; "
            f"the standby applied {other.facts_applied}, pinned {other.applies_facts}"
        ) from exc
    took = time.monotonic() - gone
    assert other.applies_facts and other.facts_applied == 3
    # At once (well under the pin's timeout), or once the pin has timed out. A fact the server
    # delivered to the instance that died, in the moment before it knew the connection was gone,
    # comes again after the facts' ack wait: deliveries beyond the three facts say so.
    after = await nc.jetstream().consumer_info(subjects.FACTS_STREAM, FACTS_CONSUMER)
    redelivered = after.delivered.consumer_seq - before.delivered.consumer_seq - 3
    bound = FACTS_PIN_TIMEOUT if goes == "stops" else FACTS_PIN_TIMEOUT + 1.0
    if goes == "dies holding a fact":
        assert redelivered > 0
    if redelivered > 0:  # given to the instance that died (when held, or in the moment it went)
        bound = FACTS_ACK_WAIT + FACTS_PIN_TIMEOUT + 1.0
    assert took < bound, f"the standby took {took:.2f}s to take over"
    print(f"\nfacts taken over in {took:.2f}s from an instance that {goes} ({redelivered} redelivered)")


async def test_an_instance_busy_for_longer_than_the_pin_timeout_keeps_its_pin(
    nc: NATS, machines: list[StateMachineService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applying facts can take longer than the pin's timeout and the facts' ack wait (appends
    waiting out the log's election): the pinned instance keeps asking meanwhile, and keeps the
    facts in hand alive, so no standby is pinned behind its back, no fact is given again while it
    is applied, and the facts are never applied by two instances at once, out of order."""
    names = [f"busy-{i}" for i in range(3)]
    for name in names:
        assert (await send(nc, "create", name=name, command_id=f"c-{name}")).accepted
    started = ContainerStarted(sandbox_id=sandbox_id(machines, names[0]), incarnation="2026-12-01T00:00:01Z")
    await report(nc, names[0], started)
    await until(lambda: all(m.states[names[0]].phase is Phase.READY for m in machines), "the first fact applied")
    pinned = next(m for m in machines if m.applies_facts)
    other = next(m for m in machines if not m.applies_facts)
    apply = pinned._apply_facts

    async def slowly(msgs: list[Any]) -> None:
        await asyncio.sleep(max(FACTS_PIN_TIMEOUT * 2, FACTS_ACK_WAIT * 1.5))
        await apply(msgs)

    monkeypatch.setattr(pinned, "_apply_facts", slowly)
    # The second fact comes while the first is being applied, after the pin's timeout.
    for name in names[1:]:
        started.sandbox_id = sandbox_id(machines, name)
        await report(nc, name, started)
        await asyncio.sleep(FACTS_PIN_TIMEOUT + 0.5)
    for name in names[1:]:
        await until(lambda name=name: pinned.states[name].phase is Phase.READY, f"{name} Ready", timeout=20)
    assert other.facts_applied == 0 and not other.applies_facts
    assert pinned.applies_facts and pinned.facts_applied == 3


async def test_an_instance_that_starts_reads_the_snapshot_and_folds_only_what_came_after(
    nats_server: NatsServer, nc: NATS
) -> None:
    writer = StateMachineService(await nats.connect(nats_server.url), snapshot_every=100, snapshot_check=0.05)
    await writer.start()
    try:
        for i in range(120):
            assert (await send(nc, "create", name=f"snap-{i}", command_id=f"snap-{i}")).accepted
        await until(lambda: writer.snapshot_at >= 100, "a snapshot past seq 100")
        written = writer.snapshot_at
        for i in range(120, 125):  # after the snapshot
            assert (await send(nc, "create", name=f"snap-{i}", command_id=f"snap-{i}")).accepted
        reader = StateMachineService(await nats.connect(nats_server.url), snapshot_every=10**9)
        await reader.start()
        try:
            assert reader.snapshot_at == written  # started from the snapshot...
            assert reader.states == writer.states  # ...and folded the rest to the same states
            assert reader.position == writer.position
            # and it decides on them: a create of a name the snapshot holds is refused
            again = await send(nc, "create", name="snap-3", command_id="snap-3-again")
            assert again.error is not None and again.error.code == "already_exists", again
        finally:
            await reader.stop()
            await reader.nc.close()
    finally:
        await writer.stop()
        await writer.nc.close()


@pytest.mark.parametrize("spoil", ["garbage", "another shape", "another log", "past the log"])
async def test_a_snapshot_that_does_not_fit_the_log_or_the_code_is_ignored(
    nats_server: NatsServer, nc: NATS, spoil: str
) -> None:
    first = StateMachineService(await nats.connect(nats_server.url))
    await first.start()
    for i in range(10):
        assert (await send(nc, "create", name=f"sp-{i}", command_id=f"sp-{i}")).accepted
    await until(lambda: first.position >= 10, "the creates folded")
    await first.write_snapshot()
    await first.stop()
    await first.nc.close()
    store = await snapshots.snapshot_store(nc.jetstream())
    snapshot = snapshots.decode_snapshot((await store.get(snapshots.OBJECT)).data or b"")
    wrong = {"another shape": {"schema": "0" * 16}, "another log": {"log_created": "2020-01-01T00:00:00+00:00"}}
    wrong["past the log"] = {"position": snapshot.position + 5}
    if spoil == "garbage":
        await store.put(snapshots.OBJECT, b"\x00not a snapshot")
    else:
        # states that do not match the log, which must not be believed
        states = [msgspec.structs.replace(s, phase=Phase.ERROR) for s in snapshot.states]
        spoilt = msgspec.structs.replace(snapshot, states=states, **wrong[spoil])
        await store.put(snapshots.OBJECT, snapshots.encode_snapshot(spoilt))
    second = StateMachineService(await nats.connect(nats_server.url))
    await second.start()
    try:
        assert second.snapshot_at == 0  # the log was folded from its start
        assert {s.phase for s in second.states.values()} == {Phase.PROVISIONING}, second.states
        assert len(second.states) == 10
    finally:
        await second.stop()
        await second.nc.close()


async def test_racing_commands_on_a_cluster_are_decided_again_never_failed(tmp_path: Path) -> None:
    """A replicated stream's leader refuses a guarded append with another error code than a single
    server (10164, not 10071): it is the same refusal, and the loser decides again."""
    nodes = nodes_of(tmp_path)
    for node in nodes:
        node.start()
    urls = server_urls(",".join(node.url for node in nodes))
    started: list[StateMachineService] = []
    nc = await nats.connect(urls)
    try:
        await jetstream_answers(nc, "the cluster's JetStream")
        for _ in range(2):
            machine = StateMachineService(await nats.connect(urls))
            await machine.start()
            started.append(machine)
        assert (await send(nc, "create", name="clustered", command_id="c-clustered")).accepted
        # raced at once; a loser that keeps losing is answered conflict, and the client sends it again
        client = SandboxClient(nc, actor="racer", retries=10)
        replies = await asyncio.gather(
            *(client.update("clustered", labels={"n": str(i)}, command_id=f"u-{i}") for i in range(40))
        )
        assert all(r.accepted and r.appended == 1 for r in replies), replies
        assert sum(m.conflicts for m in started) > 0  # they raced, and the guard refused the losers
        kinds = [e["type"].split(".")[2] for e in await history(nc.jetstream(), "clustered")]
        assert kinds == ["created"] + ["updated"] * 40, kinds
    finally:
        for machine in started:
            await machine.stop()
            await machine.nc.close()
        await nc.close()
        for node in nodes:
            node.stop()


async def test_a_fact_that_fails_by_itself_is_dead_lettered_after_its_own_failures_and_others_go_on(
    nc: NATS, machines: list[StateMachineService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error deciding on a fact (a bug, a refusal from the log) is the fact's own failure: it is
    tried again a few times, then dead-lettered for operators, and never comes back for ever (the
    server no longer gives up on a message by itself)."""
    monkeypatch.setattr(eventlog, "RETRY_DELAYS", (0.1, 0.1, 0.1, 0.1))
    poison, healthy = "fails-0", "fails-1"
    for name in (poison, healthy):
        assert (await send(nc, "create", name=name, command_id=f"c-{name}")).accepted
    react = statemachine.react

    def failing(state: Any, fact: Fact) -> Any:
        if state is not None and state.name == poison:
            raise RuntimeError("a bug in react")
        return react(state, fact)

    monkeypatch.setattr(statemachine, "react", failing)
    for name in (poison, healthy):
        await report(nc, name, ContainerStarted(sandbox_id=sandbox_id(machines, name), incarnation="i1"))
    await until(lambda: all(m.states[healthy].phase is Phase.READY for m in machines), "the other fact applied")
    js = nc.jetstream()

    async def dead_lettered() -> bool:
        try:
            await js.get_last_msg(subjects.DEADLETTER_STREAM, subjects.deadletter(FACTS_CONSUMER, poison))
        except NotFoundError:
            return False
        return True

    for _ in range(100):
        if await dead_lettered():
            break
        await asyncio.sleep(0.1)
    assert await dead_lettered(), "the failing fact was not dead-lettered"
    info = await js.consumer_info(subjects.FACTS_STREAM, FACTS_CONSUMER)
    assert info.num_ack_pending == 0
    assert all(m.states[poison].phase is Phase.PROVISIONING for m in machines)


async def test_a_fact_the_log_could_not_take_holds_back_its_sandboxs_later_facts(
    nc: NATS, machines: list[StateMachineService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fact naked because the log could not take its events for now comes again after a while;
    the sandbox's facts reported after it wait behind it, so that none is applied out of order."""
    name = "held-0"
    assert (await send(nc, "create", name=name, command_id=f"c-{name}")).accepted
    await report(nc, name, ContainerStarted(sandbox_id=sandbox_id(machines, name), incarnation="i1"))
    await until(lambda: all(m.states[name].phase is Phase.READY for m in machines), "the first fact applied")
    pinned = next(m for m in machines if m.applies_facts)
    decide_and_append = pinned._decide_and_append
    calls: list[str] = []

    async def once_unavailable(sandbox: str, decide_fn: Any, cause: Any) -> Reply:
        calls.append(cause.id)
        if len(calls) == 1:
            return error_reply(ErrorCode.UNAVAILABLE, "the log is electing its leader", sandbox)
        return await decide_and_append(sandbox, decide_fn, cause)

    monkeypatch.setattr(pinned, "_decide_and_append", once_unavailable)
    ids = []
    for incarnation in ("i2", "i3"):
        fact = ContainerStarted(sandbox_id=sandbox_id(machines, name), incarnation=incarnation)
        envelope = Envelope(
            id=new_id(), type=type_name(type(fact)), source="test/driver", subject=name, time=now(), data=fact
        )
        await publish_fact(nc.jetstream(), envelope)
        ids.append(envelope.id)
    await until(lambda: calls.count(ids[0]) >= 2 and ids[1] in calls, "both facts applied", timeout=20)
    assert calls.index(ids[1]) > calls.index(ids[0], 1), calls


async def test_only_a_sandboxs_own_host_speaks_for_it_and_a_fact_speaks_for_its_subjects_sandbox_alone(
    nats_server: NatsServer, nc: NATS
) -> None:
    """A fact's subject names the host whose worker reported it (NATS lets a host's worker user
    publish on its own host's subjects only): a fact about a sandbox on another host, or one whose
    envelope names a sandbox other than its subject's, is dead-lettered and moves nothing."""
    await announce_host(nats_server.url, "host-a", engines=("podman",))
    service = StateMachineService(await nats.connect(nats_server.url), drivers=("podman",), place=True)
    await service.start()
    js = nc.jetstream()
    try:
        assert (await send(nc, "create", name="on-a", command_id="c-on-a")).accepted
        assert (await send(nc, "create", name="other-a", command_id="c-other-a")).accepted
        state = service.states["on-a"]
        assert state.host == "host-a" and state.phase is Phase.PROVISIONING
        started = ContainerStarted(sandbox_id=state.sandbox_id, incarnation="run-1")

        async def dead_lettered(name: str, count: int) -> bool:
            info = await js.stream_info(
                subjects.DEADLETTER_STREAM, subjects_filter=subjects.deadletter(FACTS_CONSUMER, name)
            )
            return sum((info.state.subjects or {}).values()) >= count

        forged = Envelope(
            id="from-b", type=type_name(ContainerStarted), source="b", subject="on-a", time=now(), data=started
        )
        await publish_fact(js, forged, "host-b")  # another host's worker about host-a's sandbox
        await until(lambda: dead_lettered("on-a", 1), "the other host's fact dead-lettered", timeout=10)
        # host-a's own subject, but the envelope speaks for another sandbox than the subject's
        raw = msgspec.json.encode(msgspec.structs.replace(forged, id="renamed"))
        await js.publish(subjects.fact("other-a", "host-a"), raw, headers={"Nats-Msg-Id": "renamed"})
        await until(lambda: dead_lettered("other-a", 1), "the renamed fact dead-lettered", timeout=10)
        await asyncio.sleep(0.2)
        assert service.states["on-a"].phase is Phase.PROVISIONING
        assert service.states["other-a"].phase is Phase.PROVISIONING

        own = msgspec.structs.replace(forged, id="from-a", source="a")
        await publish_fact(js, own, "host-a")  # its own host's worker: believed
        await until(lambda: service.states["on-a"].phase is Phase.READY, "on-a Ready", timeout=10)
        assert service.states["other-a"].phase is Phase.PROVISIONING
    finally:
        await service.stop()
        await service.nc.close()


async def test_a_facts_stream_an_earlier_version_made_is_brought_to_the_per_host_subjects_keeping_its_facts(
    nats_server: NatsServer, nc: NATS
) -> None:
    js = nc.jetstream()
    older = dataclasses.replace(streams.facts_stream_config(), subjects=[f"{subjects.FACTS}.*"])
    await js.add_stream(older)
    await js.publish(subjects.fact("before"), b"{}")  # a fact reported before hosts
    service = StateMachineService(await nats.connect(nats_server.url), drivers=("podman",))
    await service.start()
    try:
        info = await js.stream_info(subjects.FACTS_STREAM)
        assert info.config.subjects == [subjects.FACTS_ALL] and info.state.messages >= 1
        ack = await js.publish(subjects.fact("after", "host-a"), b"{}")  # taken now
        assert ack.stream == subjects.FACTS_STREAM
    finally:
        await service.stop()
        await service.nc.close()
