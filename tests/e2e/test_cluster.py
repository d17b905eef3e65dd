"""``sandboxctl up --cluster 3``: three nats-server nodes routed into one JetStream cluster on this
host, every stream replicated on all three, and the services on all three URLs. The node that
leads the log, killed with SIGKILL, is restarted by up, and while it is down commands are still
answered and their events still logged (two of three replicas are a quorum, and elect a leader)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sandboxctl.auth import AuthStore
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.embedded import free_port
from sandboxctl.runtime.supervise import port_in_use
from tests.conftest import cli_process
from tests.uprun import Up, up_env


def free_run(count: int) -> int:
    """A port from which ``count`` ports in a row are free."""
    for _ in range(200):
        first = free_port()
        if first + count < 65536 and not any(port_in_use(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} free ports in a row")


async def test_up_runs_a_three_node_cluster_that_answers_and_logs_through_the_loss_of_a_node(
    tmp_path: Path, podman_url: str, image: str, sandboxes: list[str]
) -> None:
    port = free_run(3)
    env = up_env(tmp_path, port, podman_url=podman_url)
    up = Up(env, port, "--cluster", "3")
    await up.start()
    try:
        await up.up()
        urls = ",".join(f"nats://127.0.0.1:{port + i}" for i in range(3))
        assert f"export SANDBOXCTL_NATS_URL={urls}" in up.text, up.text
        env = {**env, "SANDBOXCTL_NATS_URL": urls}
        creds = AuthStore(up.data / "auth").credentials("local-op")
        client = await SandboxClient.connect(
            urls, user=creds.user, password=creds.password, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        try:
            js = client.nc.jetstream()
            for stream in (subjects.LOG_STREAM, subjects.DEADLETTER_STREAM):  # an admin may not read FACTS
                info = await js.stream_info(stream)
                assert info.config.num_replicas == 3, info
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2, info.cluster

            name = f"cl-{port}"
            sandboxes.append(name)
            code, _, err = await cli_process(env, "create", name, "--image", image)
            assert code == 0, err

            # The log's leader dies: the other two are a quorum, elect a leader, and commands are
            # answered and logged meanwhile (the state machine waits out the election).
            leader = (await js.stream_info(subjects.LOG_STREAM)).cluster.leader  # type: ignore[union-attr]
            index = int(str(leader).rsplit("-n", 1)[1])
            pid_file = "nats-server.pid" if index == 1 else f"nats-server-{index}.pid"
            victim = int((up.data / "auth" / pid_file).read_text().split()[0])
            os.kill(victim, signal.SIGKILL)
            began = time.monotonic()
            for verb in ("stop", "start"):
                code, _, err = await cli_process(env, verb, name)
                assert code == 0, (verb, err)
            waited = time.monotonic() - began
            await up.line(rf"nats-server-{index} \(pid {victim}\) exited with signal SIGKILL; restarting it")
            await up.line(rf"nats-server-{index} is back \(pid \d+, restart 1\)")
            history = await client.history(name)
            kinds = [h["type"].split(".")[2] for h in history]
            assert kinds[-4:] == ["stop_requested", "stopped", "start_requested", "ready"], kinds
            print(f"\ncluster: stop and start with the log's leader of three nodes killed took {waited:.1f}s")
            code, _, err = await cli_process(env, "delete", name)
            assert code == 0, err
        finally:
            await client.close()
        assert await up.stop() == 0, up.text
    finally:
        await up.kill()


async def test_a_cluster_is_not_made_on_a_data_directory_that_holds_a_single_servers_log(
    tmp_path: Path, podman_url: str
) -> None:
    port = free_run(3)
    env = up_env(tmp_path, port, podman_url=podman_url)
    single = await Up(env, port).start()
    try:
        await single.up()
        assert await single.stop() == 0
    finally:
        await single.kill()
    clustered = await Up(env, port, "--cluster", "3").start()
    try:
        assert await clustered.exit_code() == 5, clustered.text
    finally:
        await clustered.kill()
    assert clustered.lines[-1].startswith("sandboxctl: failed_precondition: "), clustered.text
    assert "holds the log of a single nats-server" in clustered.text


@pytest.mark.parametrize("size", ["2", "4"])
async def test_a_cluster_size_raft_cannot_use_is_refused(tmp_path: Path, size: str) -> None:
    code, _, err = await cli_process(up_env(tmp_path, 4222), "up", "--cluster", size)
    assert code == 2 and "--cluster" in err and "invalid choice" in err, err
