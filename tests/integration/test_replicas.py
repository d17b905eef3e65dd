"""A cluster's URLs on real nats-servers: how many replicas the streams get (3 on a cluster of
three nodes, made here as ``up --cluster 3`` makes it without auth, 1 on a single server, and
what SANDBOXCTL_REPLICAS says when it is set), and a server of the list that does not answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from sandboxctl.bus.servers import server_urls
from sandboxctl.bus.streams import ensure_streams, workspaces
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.config import Config
from sandboxctl.runtime.embedded import ClusterNode, ControlPlane, NatsServer, free_port
from sandboxctl.services.statemachine import StateMachineService
from testing.hosts import announce_host
from tests.conftest import until


def nodes_of(tmp_path: Path) -> list[NatsServer]:
    """Three nodes of one cluster, not started."""
    routes = [free_port() for _ in range(3)]
    secret = secrets.token_urlsafe(12)
    return [
        NatsServer(
            tmp_path / f"n{i}",
            cluster=ClusterNode(
                index=i,
                name="replicas-test",
                tag="t",
                port=routes[i - 1],
                peers=tuple(p for j, p in enumerate(routes, 1) if j != i),
                secret=secret,
            ),
        )
        for i in range(1, 4)
    ]


# A connection that rides out a node's loss, and leaves a frozen node within seconds.
OPTIONS: dict[str, Any] = {
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.2,
    "ping_interval": 1,
    "max_outstanding_pings": 2,
}


class Cluster:
    """Three running nodes of one cluster, and what a test opens against them."""

    def __init__(self, nodes: list[NatsServer]) -> None:
        self.nodes = nodes
        self.frozen: list[NatsServer] = []
        self.closers: list[Callable[[], Awaitable[Any]]] = []

    async def connect(self, node: NatsServer) -> NATS:
        nc = await nats.connect(node.url, **OPTIONS)
        self.closers.append(nc.close)
        return nc

    async def state_machine(self, node: NatsServer) -> StateMachineService:
        """A state machine connected to ``node``, started."""
        machine = StateMachineService(await self.connect(node))
        self.closers.append(machine.stop)
        await machine.start()
        return machine

    async def client(self, url: str, actor: str, **options: Any) -> SandboxClient:
        client = await SandboxClient.connect(url, actor=actor, **options)
        self.closers.append(client.close)
        return client

    def freeze(self, node: NatsServer) -> None:
        """SIGSTOP: a hung process, or a machine gone without a word (woken at the end)."""
        assert node.proc is not None
        self.frozen.append(node)
        os.kill(node.proc.pid, signal.SIGSTOP)


@contextlib.asynccontextmanager
async def running_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three nodes started; at the end, frozen ones woken, whatever was opened closed (the last
    first), and every node stopped."""
    cluster = Cluster(nodes_of(tmp_path))
    try:
        for node in cluster.nodes:
            node.start()
        yield cluster
    finally:
        for node in cluster.frozen:
            if node.proc is not None:
                os.kill(node.proc.pid, signal.SIGCONT)
        for close in reversed(cluster.closers):
            with contextlib.suppress(Exception):
                await close()
        for node in cluster.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    nodes = nodes_of(tmp_path)
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def jetstream_answers(nc: NATS, what: str = "the cluster's JetStream") -> None:
    """Once JetStream answers on ``nc`` (a cluster elects its meta leader first)."""

    async def answers() -> bool:
        try:
            return bool(await nc.jetstream(timeout=2).account_info())
        except Exception:
            return False

    await until(answers, what, timeout=60, every=0.5)


async def replicas(url: str, wanted: int | None) -> tuple[int, int]:
    nc = await nats.connect(server_urls(url), connect_timeout=2, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=5)
        for _ in range(120):  # until the cluster's JetStream has its meta leader
            try:
                await js.account_info()
                break
            except Exception:
                await asyncio.sleep(0.25)
        await ensure_streams(js, wanted)
        await workspaces(js, wanted)
        log = await js.stream_info(subjects.LOG_STREAM)
        bucket = await js.stream_info(subjects.WORKSPACES_STREAM)
        return log.config.num_replicas or 1, bucket.config.num_replicas or 1
    finally:
        await nc.close()


async def test_a_cluster_of_three_gets_three_replicas_and_a_single_server_one(
    cluster: list[NatsServer], nats_server: NatsServer
) -> None:
    assert await replicas(",".join(node.url for node in cluster), None) == (3, 3)
    assert await replicas(nats_server.url, None) == (1, 1)


async def test_streams_wait_for_a_cluster_short_of_nodes_and_never_settle_for_fewer_replicas(tmp_path: Path) -> None:
    """Two of three nodes up: the cluster has its quorum, but no three nodes to place the log's
    replicas on (JetStream answers "no suitable peers"). The streams are waited for, and made with
    three replicas once the third node has joined."""
    nodes = nodes_of(tmp_path)
    try:
        for node in nodes[:2]:
            node.start()
        urls = ",".join(node.url for node in nodes[:2])
        nc = await nats.connect(server_urls(urls))
        try:
            await jetstream_answers(nc, "the two nodes' JetStream")
        finally:
            await nc.close()
        made = asyncio.create_task(replicas(urls, None))
        await asyncio.sleep(4)
        assert not made.done(), made  # neither failed nor settled for fewer
        nodes[2].start()
        assert await asyncio.wait_for(made, 60) == (3, 3)
    finally:
        for node in nodes:
            node.stop()


async def test_the_configured_replicas_win(cluster: list[NatsServer]) -> None:
    assert await replicas(",".join(node.url for node in cluster), 1) == (1, 1)


async def test_a_server_that_does_not_answer_at_start_is_named_and_the_others_serve(
    nats_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    live = nats_config.nats_url
    nats_config.nats_url = f"{dead},{live}"
    plane = await ControlPlane(nats_config, components=("statemachine",)).start()
    try:
        await announce_host(live, nats_config.host)
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"the NATS server at {dead} does not answer (Connection refused); going on with the others" in said
        client = await SandboxClient.connect(nats_config.nats_url, actor="test")
        try:
            reply = await client.create("named", "localhost/img:latest", driver="podman")
            assert reply.accepted and reply.seq > 0
        finally:
            await client.close()
    finally:
        await plane.stop()
