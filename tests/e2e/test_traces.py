"""OpenTelemetry traces across processes: a caller's trace goes on through sandboxctl.

The test process traces as an application that uses the SDK does (OpenTelemetry's SDK, its
in-memory exporter); ``sandboxctl up`` and a CLI call run in processes of their own and export
with OTLP over HTTP to a collector this test runs (Starlette, decoding OTLP's protobuf). A stop
sent by the SDK and a start sent by the CLI must each be one unbroken trace: every span's parent
is in the trace, from the caller through the state machine's decision, the worker's engine call,
the fact, the phase event and the projection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandboxctl.runtime.config import TRACE_EXPORT_WAIT
from sandboxctl.runtime.embedded import free_port
from tests.conftest import cli_process, podman
from tests.uprun import Up, up_env


@dataclass(frozen=True)
class Seen:
    """One span as a collector sees it: ids as hex, the process (service.name) that made it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    service: str


class Collector:
    """An OTLP/HTTP trace receiver: what the processes under test export, span by span."""

    def __init__(self) -> None:
        self.spans: list[Seen] = []
        self.arrived = asyncio.Event()
        self.app = Starlette(routes=[Route("/v1/traces", self.receive, methods=["POST"])])

    async def receive(self, request: Request) -> Response:
        export = ExportTraceServiceRequest.FromString(await request.body())
        for resource_spans in export.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        Seen(span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                             attributes.get("service.name", ""))
                    )  # fmt: skip
        self.arrived.set()
        return Response(b"", media_type="application/x-protobuf")


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    port = free_port()
    received = Collector()
    server = uvicorn.Server(uvicorn.Config(received.app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the collector did not start"
        await asyncio.sleep(0.02)
    try:
        yield received, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


def in_memory() -> InMemorySpanExporter:
    """The test process's spans, kept in memory (the global provider is set once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def unbroken(spans: Iterable[Seen], root: str) -> dict[str, Seen]:
    """The spans of ``root``'s trace by id, once each one's parent is among them (or it is the root)."""
    by_id = {s.span_id: s for s in spans}
    for span in by_id.values():
        assert span.span_id == root or span.parent_id in by_id, (span, sorted(by_id))
    return by_id


def child(spans: dict[str, Seen], parent: Seen, prefix: str) -> Seen:
    found = [s for s in spans.values() if s.parent_id == parent.span_id and s.name.startswith(prefix)]
    assert found, f"no {prefix!r} span under {parent.name!r}: {sorted((s.name, s.parent_id) for s in spans.values())}"
    return found[0]


async def trace_of(received: Collector, trace_id: str, enough: int, timeout: float = 60.0) -> list[Seen]:
    """The spans of ``trace_id`` received, once there are ``enough`` of them. A minute: an export
    the collector was slow to answer on a loaded machine is sent again after the exporter's own
    timeout (5 s in a service) and backoff; on one CI run a span had not come after 20 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        spans = [s for s in received.spans if s.trace_id == trace_id]
        if len(spans) >= enough:
            return spans
        assert loop.time() < deadline, f"{len(spans)} spans of trace {trace_id} in {timeout}s: {spans}"
        received.arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(received.arrived.wait(), 0.5)


def assert_the_way(spans: dict[str, Seen], top: Seen, verb: str, engine_call: str) -> None:
    """The hops of one command, each the child of the one before: decide, work (around the engine
    call), react to the fact, and the projection of both events appended."""
    decide = child(spans, top, f"decide {verb}")
    work = child(spans, decide, "work ")
    child(spans, work, f"engine podman.{engine_call}")
    react = child(spans, work, "react ")
    child(spans, decide, "project")  # the request's event, projected
    child(spans, react, "project")  # the phase event, projected
    services = {s.service for s in (decide, work, react)}
    assert services == {"sandboxctl"}, services


async def test_a_stop_and_a_start_are_each_one_unbroken_trace_across_the_processes(
    tmp_path: Path, podman_url: str, image: str
) -> None:
    mine = in_memory()
    async with collector() as (received, endpoint):
        port = free_port()
        env = up_env(tmp_path, port, podman_url=podman_url)
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
        up = await Up(env, port).start()
        name = f"traced-{port}"
        try:
            await up.up()
            assert endpoint in await up.line("traces to "), up.text
            client = await up.client()
            try:
                created = await client.create(name, image, command=["sleep", "600"])
                await client.wait_for(name, "Ready", created.seq, timeout=60)

                # The SDK, inside the application's own span: the trace goes on through sandboxctl.
                with trace.get_tracer("an-application").start_as_current_span("caller") as caller:
                    stopped = await client.stop(name)
                await client.wait_for(name, "Stopped", stopped.seq, timeout=60)
            finally:
                await client.close()
            trace_id = format(caller.get_span_context().trace_id, "032x")
            root = format(caller.get_span_context().span_id, "016x")
            ours = [
                Seen(s.name, format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"),
                     format(s.parent.span_id, "016x") if s.parent else "", "test")
                for s in mine.get_finished_spans() if s.context.trace_id == caller.get_span_context().trace_id
            ]  # fmt: skip
            spans = unbroken(ours + await trace_of(received, trace_id, enough=6), root)
            send = child(spans, spans[root], "send stop")
            assert_the_way(spans, send, "stop", "stop")

            # The CLI, exporting by itself: its call is the root of the start's trace.
            code, _, err = await cli_process(env, "start", name)
            assert code == 0, err
            clis = [s for s in received.spans if s.name == "sandboxctl start"]
            assert len(clis) == 1 and clis[0].service == "sandboxctl-cli" and not clis[0].parent_id, clis
            spans = unbroken(await trace_of(received, clis[0].trace_id, enough=7), clis[0].span_id)
            send = child(spans, clis[0], "send start")
            assert_the_way(spans, send, "start", "start")
        finally:
            assert await up.stop() == 0, up.text
            podman("rm", "-f", "-t", "0", f"sandboxctl-{name}", check=False)
            podman("volume", "rm", "-f", f"sandboxctl-{name}-workspace", check=False)


async def test_a_cli_call_whose_collector_is_away_ends_soon_with_its_own_reason(tmp_path: Path) -> None:
    """The exporter's 10 s of retries would hold every call: a call waits TRACE_EXPORT_WAIT for
    its spans at most, and its one-line reason and exit code are its own."""
    dead, nowhere = free_port(), free_port()
    env = up_env(tmp_path, nowhere)
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{dead}")
    loop = asyncio.get_running_loop()
    began = loop.time()
    code, _, err = await cli_process(env, "get", "anything")
    took = loop.time() - began
    assert code == 8 and "sandboxctl: unavailable: cannot reach NATS" in err, err
    assert took < TRACE_EXPORT_WAIT + 4.0, took  # the interpreter's start and the refused connect
    assert "retrying" not in err and len(err.strip().splitlines()) <= 2, err
