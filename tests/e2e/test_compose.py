"""compose.yaml really starts: the images are built on this machine with no registry
(scripts/build-images.sh: a Debian base from Debian packages, sandboxctl on it from its wheel),
Debian's docker-compose brings up the three nats nodes and every service twice over (one
worker), and a sandbox is created, stopped, started and deleted through it on the engine's
socket; a state machine killed on the way is restarted by compose and missed by no one. Then
the stack is torn down and leaves nothing behind. And the image's nats-server, run as a
cluster's nodes by testcontainers, keeps the log through the loss of the node that leads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

from sandboxctl.bus.reading import history
from sandboxctl.client import SandboxClient
from sandboxctl.events import subjects
from sandboxctl.runtime.embedded import free_port
from sandboxctl.services.statemachine import StateMachineService
from tests.conftest import ROOT, cli_process, until
from tests.integration.test_replicas import OPTIONS, jetstream_answers

pytestmark = pytest.mark.timeout(900)


def docker(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, env=env)


def compose(env: dict[str, str], project: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker-compose", "--no-ansi", "-p", project, "-f", str(ROOT / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0 or not check, f"docker-compose {' '.join(args)}: {done.stderr}{done.stdout}"
    return done


@pytest.fixture(scope="session")
def sandboxctl_image(docker_url: str) -> str:
    """The images compose.yaml runs, built by the script users run, into the test's docker."""
    env = {**os.environ, "ENGINE": "docker", "DOCKER_HOST": docker_url}
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh")], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert built.returncode == 0, built.stderr + built.stdout
    base, image = built.stdout.split()[-2:]
    assert base.startswith("localhost/sandboxctl-base:") and image.startswith("localhost/sandboxctl:")
    return image


@pytest.fixture
def stack(docker_url: str, sandboxctl_image: str) -> Iterator[tuple[dict[str, str], str]]:
    """compose.yaml up on free ports, against the test's docker; down (volumes too) after."""
    project = f"sbx{free_port()}"
    ports = [free_port() for _ in range(6)]
    env = {
        **os.environ,
        "DOCKER_HOST": docker_url,
        "SANDBOXCTL_IMAGE": sandboxctl_image,
        "SANDBOXCTL_ENGINE_SOCKET": docker_url.removeprefix("unix://"),
        **{f"SANDBOXCTL_NATS_PORT_{i + 1}": str(port) for i, port in enumerate(ports[:3])},
        **{f"SANDBOXCTL_ROUTE_PORT_{i + 1}": str(port) for i, port in enumerate(ports[3:])},
    }
    compose(env, project, "up", "-d")
    try:
        yield env, project
    finally:
        print(compose(env, project, "logs", "--tail=30", check=False).stdout[-6000:])
        compose(env, project, "down", "-v", "--timeout", "10")


def urls(env: dict[str, str]) -> str:
    return ",".join(f"nats://127.0.0.1:{env[f'SANDBOXCTL_NATS_PORT_{i}']}" for i in (1, 2, 3))


def running(env: dict[str, str], container: str) -> bool:
    found = docker(env, "container", "inspect", container, check=False)
    return found.returncode == 0 and json.loads(found.stdout)[0]["State"]["Running"]


def die(env: dict[str, str], container: str) -> None:
    """SIGKILL the container's service, as a crash would (``docker kill`` is a stop by hand, which
    restart policies leave alone): the child of its init, tini, seen from the host."""
    init = json.loads(docker(env, "container", "inspect", container).stdout)[0]["State"]["Pid"]
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    assert children, f"{container} runs nothing under its init"
    os.kill(int(children[0]), signal.SIGKILL)


def restarted(env: dict[str, str], container: str, began: str) -> bool:
    state = json.loads(docker(env, "container", "inspect", container).stdout)[0]["State"]
    return bool(state["Running"]) and state["StartedAt"] != began


async def test_compose_brings_up_a_replicated_plane_from_local_images_and_runs_a_sandbox_through_it(
    stack: tuple[dict[str, str], str], image: str, docker_url: str
) -> None:
    env, project = stack
    # exec reaches the engine from where the command line runs: the same socket the worker has.
    cli_env = {**os.environ, "SANDBOXCTL_NATS_URL": urls(env), "SANDBOXCTL_DOCKER_URL": docker_url}
    for key in ("SANDBOXCTL_CREDENTIALS", "SANDBOXCTL_USER", "SANDBOXCTL_PASSWORD", "SANDBOXCTL_DATA_DIR"):
        cli_env.pop(key, None)

    # Every service answers, twice over but the worker, once the cluster has formed.
    async def all_up() -> bool:
        code, out, _ = await cli_process(cli_env, "status", "-o", "json")
        if code != 0 or not out.strip().startswith("["):
            return False
        components = sorted(str(r["component"]) for r in json.loads(out))
        return components == sorted(
            ["statemachine"] * 2 + ["projector"] * 2 + ["query"] * 2 + ["reaper"] * 2 + ["driver-docker", "host"]
        )

    await until(all_up, "every service of the compose stack reporting ok", timeout=120, every=1.0)

    client = await SandboxClient.connect(urls(env), actor="compose-test")
    try:
        info = await client.nc.jetstream().stream_info(subjects.LOG_STREAM)
        assert info.config.num_replicas == 3  # three nodes: the log is replicated on each
        name = f"cmp-{project}"
        reply = await client.create(name, image, driver="docker", command=["sleep", "100000"])
        await client.wait_for(name, "Ready", reply.seq, timeout=60)
        container = f"sandboxctl-{name}"
        assert running(env, container)
        code, out, err = await cli_process(cli_env, "exec", name, "--", "sh", "-c", "echo kept > /workspace/f")
        assert code == 0, err

        # A state machine dies: compose restarts it, and the other answers meanwhile.
        killed = f"{project}_statemachine-1_1"
        began = json.loads(docker(env, "container", "inspect", killed).stdout)[0]["State"]["StartedAt"]
        die(env, killed)
        reply = await client.stop(name, timeout=2)
        await client.wait_for(name, "Stopped", reply.seq, timeout=60)
        assert not running(env, container)
        reply = await client.start(name)
        await client.wait_for(name, "Ready", reply.seq, timeout=60)
        code, out, err = await cli_process(cli_env, "exec", name, "--", "cat", "/workspace/f")
        assert (code, out.strip()) == (0, "kept"), err
        await until(lambda: restarted(env, killed, began), "compose restarting the state machine")

        reply = await client.delete(name)
        await client.wait_for(name, "Deleted", reply.seq, timeout=60)
        assert docker(env, "container", "inspect", container, check=False).returncode != 0
        volumes = docker(env, "volume", "ls", "-q").stdout.split()
        assert not [v for v in volumes if name in v], volumes
    finally:
        await client.close()


async def test_compose_down_leaves_nothing_behind(stack: tuple[dict[str, str], str]) -> None:
    env, project = stack
    label = f"label=com.docker.compose.project={project}"
    await until(lambda: len(docker(env, "ps", "-q", "--filter", label).stdout.split()) == 10, "ten containers up")
    compose(env, project, "down", "-v", "--timeout", "10")
    assert docker(env, "ps", "-aq", "--filter", label).stdout.split() == []
    assert docker(env, "volume", "ls", "-q", "--filter", label).stdout.split() == []


def node(image: str, index: int, ports: list[int], routes: list[int]) -> DockerContainer:
    """A node of a three-node cluster: the image's nats-server, on the host's network."""
    return (
        DockerContainer(image)
        .with_command(
            [
                "nats-server",
                "--addr=127.0.0.1",
                "--jetstream",
                "--store_dir=/data",
                "--cluster_name=containers",
                f"--name=node-{index}",
                f"--port={ports[index]}",
                f"--cluster=nats://127.0.0.1:{routes[index]}",
                "--routes=" + ",".join(f"nats://127.0.0.1:{r}" for r in routes),
            ]
        )
        .with_kwargs(network_mode="host")
        .waiting_for(LogMessageWaitStrategy("Server is ready").with_startup_timeout(60))
    )


async def test_the_images_nats_server_runs_a_clusters_nodes_and_the_log_outlives_its_leader(
    docker_url: str, sandboxctl_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's nodes as containers of the sandboxctl image (testcontainers), the state
    machine on the host: streams are made with three replicas, the container of the node that
    leads the log is killed, a command is still answered and stored once, and the node comes back
    into the cluster when its container starts again."""
    monkeypatch.setenv("DOCKER_HOST", docker_url)
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")  # nothing pulled: the image is local
    ports, routes = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    nodes = [node(sandboxctl_image, i, ports, routes) for i in range(3)]
    urls = [f"nats://127.0.0.1:{port}" for port in ports]
    machine: StateMachineService | None = None
    client: SandboxClient | None = None
    try:
        for container in nodes:
            container.start()
        machine = StateMachineService(await nats.connect(urls, **OPTIONS), drivers=("podman",))
        await jetstream_answers(machine.nc)
        await machine.start()
        client = await SandboxClient.connect(",".join(urls), actor="containers")
        created = await client.create("tc-1", "localhost/sandboxctl-busybox:latest", driver="podman")
        assert created.accepted and created.appended == 1
        js = client.nc.jetstream()
        info = await js.stream_info(subjects.LOG_STREAM)
        assert info.config.num_replicas == 3 and info.cluster is not None
        leader = nodes[int(str(info.cluster.leader).removeprefix("node-"))]
        leader.get_wrapped_container().kill()

        touched = await client.touch("tc-1", command_id="tc-touch")  # answered once a new leader is elected
        assert touched.accepted and touched.appended == 1
        leader.get_wrapped_container().start()

        async def whole_again() -> bool:
            state = await js.stream_info(subjects.LOG_STREAM)
            replicas = state.cluster.replicas if state.cluster else None
            return bool(replicas) and len(replicas or []) == 2 and all(r.current for r in replicas or [])

        await until(whole_again, "the killed node back in the log's group", timeout=60, every=0.5)
        kinds = [e["type"].split(".")[2] for e in await history(js, "tc-1")]
        assert kinds == ["created", "touched"], kinds
    finally:
        if client is not None:
            await client.close()
        if machine is not None:
            await machine.stop()
            await machine.nc.close()
        for container in nodes:
            container.stop()
