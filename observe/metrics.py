"""Prometheus metrics: what every sandboxctl process exports, each metric defined once here.

Every process that runs services serves its metrics on one scrape endpoint (``serve``), at the
address ``--metrics`` or ``SANDBOXCTL_METRICS`` names (``up`` and ``serve`` print it). What a
process does not run, it does not report: a projector-only process has no engine calls.

Counters and histograms move where the thing happens (a command decided, an engine call made, a
phase event folded); gauges that describe state (sandboxes by phase, positions against the log's
head, consumers' backlogs) are set by the process's health observer, about once a second.
Names follow Prometheus' conventions: the ``sandboxctl_`` prefix, ``_total`` for counters (the
client library adds it), ``_seconds`` for durations, base units, and labels of bounded sets only
(a verb, a phase, a driver, an error code, a host: never a sandbox's name or id).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sandboxctl.events.commands import COMMAND_TYPES, BulkSandboxes
from sandboxctl.events.health import ServiceHealth
from sandboxctl.observe.address import parse_address
from sandboxctl.statemachine.phases import TRANSIENT, Phase
from sandboxctl.statemachine.state import SandboxState

log = logging.getLogger(__name__)


# Sandbox phases change in milliseconds (a stop once the engine is done) to minutes (a slow
# image's first create): buckets from 1 ms to 10 min.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

COMMANDS = Counter(
    "sandboxctl_commands",
    "Commands the state machine decided, by verb and outcome: accepted, or the error code it refused them with.",
    ("verb", "outcome"),
)
TRANSITIONS = Histogram(
    "sandboxctl_transition_seconds",
    "How long sandboxes spent in a transient phase before the next, by driver: "
    "Stopping to Stopped, Starting to Ready, Provisioning to Ready, Deleting to Deleted, and the rest.",
    ("from_phase", "to_phase", "driver"),
    buckets=_DURATION_BUCKETS,
)
ENGINE_CALLS = Histogram(
    "sandboxctl_engine_call_seconds",
    "Engine calls a driver worker made, by driver, operation and outcome (ok, or error).",
    ("driver", "operation", "outcome"),
    buckets=_DURATION_BUCKETS,
)
DEAD_LETTERS = Gauge(
    "sandboxctl_dead_letters",
    "Messages in the dead-letter stream, by the consumer that gave up on them.",
    ("consumer",),
)
REAPER_ACTIONS = Counter(
    "sandboxctl_reaper_actions",
    "Commands the reaper sent for idle or leased-out sandboxes, by action (warn, stop, pause, delete, archive) "
    "and outcome.",
    ("action", "outcome"),
)
WEBHOOK_DELIVERIES = Counter(
    "sandboxctl_webhook_deliveries",
    "Webhook requests by outcome: delivered (a 2xx answer), failed (a try that will be retried or "
    "dead-lettered), dead_lettered (given up on after the relay's tries).",
    ("outcome",),
)
LOG_HEAD = Gauge("sandboxctl_log_head", "The log's last sequence, as this process last asked.")
LOG_POSITION = Gauge(
    "sandboxctl_log_position", "The highest log sequence each reader of the log has folded, by service.", ("service",)
)
LOG_LAG = Gauge("sandboxctl_log_lag", "Log entries each reader is behind the log's head, by service.", ("service",))
SERVICE_UP = Gauge(
    "sandboxctl_service_up", "1 while a service of this process is healthy (ok or catching up), else 0.", ("service",)
)
SERVICE_RESTARTS = Gauge(
    "sandboxctl_service_restarts", "How often the process's supervisor restarted each service.", ("service",)
)
CONSUMER_PENDING = Gauge(
    "sandboxctl_consumer_pending",
    "Messages a service's JetStream consumer has not yet been given, by service and consumer.",
    ("service", "consumer"),
)
CONSUMER_ACK_PENDING = Gauge(
    "sandboxctl_consumer_ack_pending",
    "Messages a service's JetStream consumer was given and has not acknowledged, by service and consumer.",
    ("service", "consumer"),
)
CONSUMER_REDELIVERED = Gauge(
    "sandboxctl_consumer_redelivered",
    "Messages a service's JetStream consumer was given more than once and has not acknowledged.",
    ("service", "consumer"),
)


# The verbs a command's subject may name; anything else is counted as "unknown" (a label's values
# must be a bounded set, and a subject is whatever a careless or hostile sender made it).
VERBS = frozenset({command.VERB for command in COMMAND_TYPES} | {BulkSandboxes.VERB})


def verb_of(subject: str) -> str:
    """The ``verb`` label of a command sent to ``subject`` (sandboxctl.cmd.<verb>[.<user>])."""
    tokens = subject.split(".")
    return tokens[2] if len(tokens) > 2 and tokens[2] in VERBS else "unknown"


def outcome_of(error_code: object | None) -> str:
    """The ``outcome`` label of a command: "accepted", or its error code's value."""
    if error_code is None:
        return "accepted"
    return str(getattr(error_code, "value", error_code))


def observe_transition(before: Phase, after: Phase, driver: str, seconds: float) -> None:
    """A sandbox left ``before`` for ``after`` after ``seconds`` in it: counted when ``before`` is
    a transient phase (the ones a user waits through), and the time is a sane one."""
    if before is after or before not in TRANSIENT or not math.isfinite(seconds) or seconds < 0:
        return
    TRANSITIONS.labels(before.value, after.value, driver or "unknown").observe(seconds)


def set_health(reports: Iterable[ServiceHealth]) -> None:
    """The gauges the process's health reports tell: each service's position, lag and state, and
    the log's head."""
    for report in reports:
        SERVICE_UP.labels(report.component).set(1 if report.healthy else 0)
        SERVICE_RESTARTS.labels(report.component).set(report.restarts)
        if report.last_seq is not None:
            LOG_HEAD.set(report.last_seq)
        if report.position is not None:
            LOG_POSITION.labels(report.component).set(report.position)
        if report.lag is not None:
            LOG_LAG.labels(report.component).set(report.lag)


def set_consumer(service: str, consumer: str, pending: int, ack_pending: int, redelivered: int) -> None:
    """The backlog of ``service``'s JetStream consumer, as the server last told it."""
    CONSUMER_PENDING.labels(service, consumer).set(pending)
    CONSUMER_ACK_PENDING.labels(service, consumer).set(ack_pending)
    CONSUMER_REDELIVERED.labels(service, consumer).set(redelivered)


def set_dead_letters(by_subject: dict[str, int]) -> None:
    """The dead-letter stream's messages by subject (sandboxctl.deadletter.<consumer>.<name>),
    counted by consumer; a consumer none are left of drops to 0."""
    counts: dict[str, int] = {}
    for subject, n in by_subject.items():
        tokens = subject.split(".")
        if len(tokens) >= 4:
            counts[tokens[2]] = counts.get(tokens[2], 0) + n
    for sample in [s for family in DEAD_LETTERS.collect() for s in family.samples]:
        counts.setdefault(sample.labels["consumer"], 0)
    for consumer, n in counts.items():
        DEAD_LETTERS.labels(consumer).set(n)


class _Sandboxes(Collector):
    """``sandboxctl_sandboxes``: the sandboxes this process's projections hold, by phase, driver
    and host, counted when scraped (Deleted ones are not counted)."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], Iterable[SandboxState]]] = []

    def add(self, source: Callable[[], Iterable[SandboxState]]) -> Callable[[], None]:
        """Count what ``source`` returns from now on; the function returned stops it."""
        self._sources.append(source)
        return lambda: self._sources.remove(source) if source in self._sources else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "sandboxctl_sandboxes",
            "Sandboxes by phase, driver and host, as the projection has them (Deleted ones are not counted).",
            labels=("phase", "driver", "host"),
        )
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for source in list(self._sources):
            for state in source():
                if state.phase is not Phase.DELETED:
                    counts[(state.phase.value, state.driver, state.host)] += 1
        for labels, n in sorted(counts.items()):
            family.add_metric(labels, n)
        yield family


SANDBOXES = _Sandboxes()
REGISTRY.register(SANDBOXES)


class Endpoint:
    """One process's scrape endpoint (prometheus-client's own HTTP server, on a thread)."""

    def __init__(self, host: str, port: int, server: Any, thread: threading.Thread) -> None:
        self.host, self.port = host, port
        self._server, self._thread = server, thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address, as a URL writes it
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(address: str, registry: CollectorRegistry = REGISTRY) -> Endpoint | None:
    """Serve ``registry`` on ``address`` (``parse_address``); None when it is ``off``. OSError
    when the address cannot be bound (in use, not this host's)."""
    parsed = parse_address(address)
    if parsed is None:
        return None
    host, port = parsed
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics at http://%s:%d/metrics", host, bound)
    return Endpoint(host, bound, server, thread)
