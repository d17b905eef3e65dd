"""Prometheus metrics of a running plane, scraped as Prometheus scrapes them: over HTTP, from the
address ``up`` prints. A create, a stop, a start and one refused command move the counters and
histograms by exactly what was done, and the gauges describe what is."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sandboxctl.runtime.embedded import free_port
from tests.conftest import cli_process, podman
from tests.uprun import Up, up_env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def settled(url: str, check: object, timeout: float = 15.0) -> Samples:
    """A scrape for which ``check(samples)`` holds (the projector and the health observer move
    the gauges within a second or so of the log)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, url)
        if check(samples):  # type: ignore[operator]
            return samples
        assert loop.time() < deadline, f"metrics did not settle within {timeout}s"
        await asyncio.sleep(0.2)


async def test_a_create_stop_and_start_move_the_metrics_by_exactly_what_was_done(tmp_path: Path, image: str) -> None:
    port = free_port()
    env = up_env(tmp_path, port, own_podman=True)
    up = await Up(env, port).start()
    name = f"metrics-{port}"
    try:
        await up.up()
        line = await up.line(r"metrics at http://")
        found = re.search(r"(http://[\d.]+:\d+/metrics)", line)
        assert found, line
        url = found.group(1)
        before = await asyncio.to_thread(scrape, url)

        code, _, err = await cli_process(env, "create", name, "--image", image, "--", "sleep", "600")
        assert code == 0, err
        code, _, err = await cli_process(env, "stop", name)
        assert code == 0, err
        code, _, err = await cli_process(env, "start", name)
        assert code == 0, err
        code, _, _ = await cli_process(env, "stop", f"{name}-none")  # refused: no such sandbox
        assert code != 0

        def ready_counted(s: Samples) -> bool:
            return (
                value(s, "sandboxctl_sandboxes", phase="Ready", driver="podman", host=_host(s)) == 1
                and value(s, "sandboxctl_log_lag", service="projector") == 0
            )

        after = await settled(url, ready_counted)
        # commands, by verb and outcome
        for verb in ("create", "stop", "start"):
            assert moved(before, after, "sandboxctl_commands_total", verb=verb, outcome="accepted") == 1, verb
        assert moved(before, after, "sandboxctl_commands_total", verb="stop", outcome="not_found") == 1
        # each transition once, with a duration
        for was, now in (("Provisioning", "Ready"), ("Stopping", "Stopped"), ("Starting", "Ready")):
            labels = {"from_phase": was, "to_phase": now, "driver": "podman"}
            assert moved(before, after, "sandboxctl_transition_seconds_count", **labels) == 1, (was, now)
            assert moved(before, after, "sandboxctl_transition_seconds_sum", **labels) > 0, (was, now)
        # the engine calls the worker made for them: a create (then its start), a stop, a start
        for operation, times in (("create", 1), ("start", 2), ("stop", 1)):
            labels = {"driver": "podman", "operation": operation, "outcome": "ok"}
            assert moved(before, after, "sandboxctl_engine_call_seconds_count", **labels) == times, operation
        # the gauges: one Ready sandbox, every reader at the log's head, the consumers drained
        head = value(after, "sandboxctl_log_head")
        assert head > 0 and value(after, "sandboxctl_log_position", service="projector") == head
        assert value(after, "sandboxctl_service_up", service="statemachine") == 1
        consumers = {dict(labels)["service"] for (metric, labels) in after if metric == "sandboxctl_consumer_pending"}
        assert {"statemachine", "driver-podman"} <= consumers, consumers

        code, _, err = await cli_process(env, "delete", name)
        assert code == 0, err
        gone = await settled(url, lambda s: value(s, "sandboxctl_sandboxes", phase="Ready", driver="podman",
                                                   host=_host(s)) == 0)  # fmt: skip
        assert moved(after, gone, "sandboxctl_transition_seconds_count", from_phase="Deleting", to_phase="Deleted",
                     driver="podman") == 1  # fmt: skip
    finally:
        await up.kill()
        podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
        podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


def _host(samples: Samples) -> str:
    """The host label the plane's sandboxes carry (the machine's name, unless configured)."""
    hosts = {dict(labels).get("host", "") for (metric, labels) in samples if metric == "sandboxctl_sandboxes"}
    return next(iter(hosts), "")


async def test_a_metrics_address_that_is_none_or_taken_stops_up_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    env = up_env(tmp_path, port, own_podman=True)
    code, out, err = await cli_process(env, "up", "--port", str(port), "--metrics", "nowhere")
    assert code != 0 and "host:port" in err and len(err.strip().splitlines()) == 1, (out, err)
    code, out, err = await cli_process({**env, "SANDBOXCTL_METRICS": "9464"}, "up", "--port", str(port))
    assert code != 0 and "SANDBOXCTL_METRICS" not in out and "host:port" in err, (out, err)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = f"127.0.0.1:{held.getsockname()[1]}"
        code, out, err = await cli_process(env, "up", "--port", str(port), "--metrics", taken)
    assert code != 0 and f"cannot serve metrics on {taken}" in err, (out, err)
    assert "sandboxctl is up" not in out
