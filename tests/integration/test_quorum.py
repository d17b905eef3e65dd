"""A cluster of three that loses its quorum (two nodes down): JetStream cannot store, so a command
is answered ``unavailable`` within the state machine's patience, never left hanging and never
reported done; once the nodes are back, commands are accepted again, and nothing acknowledged
before was lost. Real nats-servers; the state machine alone (no engine is needed to decide)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sandboxctl.bus.reading import history
from sandboxctl.client import SandboxClient, SandboxError
from sandboxctl.events.replies import ErrorCode
from sandboxctl.services.statemachine import APPEND_PATIENCE
from tests.conftest import until
from tests.integration.test_replicas import jetstream_answers, running_cluster

IMAGE = "localhost/sandboxctl-busybox:latest"


async def test_without_its_quorum_a_cluster_answers_unavailable_and_serves_again_once_it_is_back(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:
        nodes = cluster.nodes
        # The state machine and the client on the node that stays: what is measured is the log's
        # answer without a majority, not a connection's move to another node.
        nc = await cluster.connect(nodes[0])
        await jetstream_answers(nc, "the cluster's JetStream")
        await cluster.state_machine(nodes[0])
        client = SandboxClient(nc, actor="quorum", retries=0, request_timeout=60)
        before = await client.create("q-before", IMAGE, driver="podman")
        assert before.accepted and before.seq > 0

        for node in nodes[1:]:  # two of three down: no majority for any RAFT group
            assert node.proc is not None
            node.proc.kill()
            node.proc.wait()
        began = time.monotonic()
        with pytest.raises(SandboxError) as refused:
            await client.create("q-during", IMAGE, driver="podman", command_id="q-during")
        waited = time.monotonic() - began
        # unavailable promises nothing was done; outcome_unknown that it may have been (its append
        # may be stored once the log has its majority again): never a reply that says done
        code = refused.value.code
        assert code in (ErrorCode.UNAVAILABLE, ErrorCode.OUTCOME_UNKNOWN), refused.value
        assert waited < APPEND_PATIENCE + 8, f"answered after {waited:.1f}s"

        for node in nodes[1:]:
            await asyncio.to_thread(node.start)
        js = nc.jetstream()

        async def logged(name: str) -> list[str] | None:
            try:
                return [e["type"].split(".")[2] for e in await history(js, name)]
            except Exception:  # the log is still electing its leader
                return None

        await until(lambda: logged("q-before"), "the log back", timeout=60, every=0.5)
        if code == ErrorCode.UNAVAILABLE:
            assert await logged("q-during") == [], "answered unavailable, yet stored"
        client.retries = 20
        after = await client.create("q-during", IMAGE, driver="podman", command_id="q-during")
        assert after.accepted and after.sandbox == "q-during"
        assert await logged("q-before") == ["created"]  # acknowledged before the loss, kept
        assert await logged("q-during") == ["created"]  # stored once, whichever attempt stored it
        print(f"\nquorum lost: a command answered {code} in {waited:.1f}s; accepted once the majority was back")
