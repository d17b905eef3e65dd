"""observe.tracing without a collector: when a process exports, how a context it did not make is
passed on, and that a process that does not trace imports nothing of OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sandboxctl.observe import tracing
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
    ],
)
def test_traces_are_exported_only_when_the_environment_asks_as_opentelemetry_reads_it(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing.wanted(environ) is wanted


def run(code: str) -> str:
    """``code`` in a fresh interpreter (this one may have set a tracer provider): its output."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_process_that_does_not_export_passes_a_context_on_unchanged_and_makes_none() -> None:
    out = run(
        "from sandboxctl.observe import tracing\n"
        "import sys\n"
        "headers = {}\n"
        "with tracing.consumed('decide stop', 'sandboxctl.cmd.stop', None):\n"
        "    tracing.inject(headers)\n"
        "print(headers, 'opentelemetry' in sys.modules)\n"
        f"with tracing.consumed('decide stop', 'sandboxctl.cmd.stop', {{'traceparent': {PARENT!r}}}):\n"
        "    tracing.inject(headers)\n"
        "print(headers['traceparent'])\n"
        "hostile = {}\n"
        "bad = {'traceparent': 'x' * 5000, 'tracestate': '=,' * 999}\n"
        "with tracing.consumed('decide stop', 'sandboxctl.cmd.stop', bad):\n"
        "    tracing.inject(hostile)\n"
        "print(hostile)\n"
    )
    untraced, passed_on, malformed = out.splitlines()
    assert untraced == "{} False"  # nothing carried, nothing imported
    assert passed_on == PARENT
    assert malformed == "{}"  # a context that is none is handled as no context, never an error


def test_a_process_that_exports_continues_the_trace_in_a_span_of_its_own() -> None:
    out = run(
        "from sandboxctl.observe import tracing\n"
        "import os\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        "headers = {}\n"
        f"with tracing.consumed('decide stop', 'sandboxctl.cmd.stop', {{'traceparent': {PARENT!r}}}):\n"
        "    tracing.inject(headers)\n"
        "print(headers['traceparent'])\n"
    )
    version, trace_id, span_id, flags = out.split("-")
    assert (version, trace_id, flags) == ("00", PARENT.split("-")[1], "01")
    assert span_id != PARENT.split("-")[2]  # a child of the caller's span, the same trace
