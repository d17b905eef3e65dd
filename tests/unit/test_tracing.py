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


def test_only_the_w3c_context_is_read_from_a_message_and_a_large_tracestate_is_not_passed_on() -> None:
    out = run(
        "import logging, io\n"
        "from sandboxctl.observe import tracing\n"
        "from opentelemetry import propagate\n"
        "from opentelemetry.propagators.textmap import DefaultGetter, DefaultSetter\n"
        "class Nothing:\n"  # an application's own global propagator, which sandboxctl's hops ignore
        "    fields = set()\n"
        "    def extract(self, carrier, context=None, getter=None): return context\n"
        "    def inject(self, carrier, context=None, setter=None): carrier['x-app'] = '1'\n"
        "propagate.set_global_textmap(Nothing())\n"
        "logs = io.StringIO(); logging.basicConfig(stream=logs, level=logging.DEBUG)\n"
        "hostile = {'Traceparent': " + repr(PARENT) + ", 'baggage': 'k=' + 'v' * 800000,\n"
        "           'tracestate': 'vendor=' + 'a' * 600}\n"
        "out = {}\n"
        "with tracing.consumed('decide stop', 'sandboxctl.cmd.stop', hostile):\n"
        "    tracing.inject(out)\n"
        "print(sorted(out), out['traceparent'], len(logs.getvalue()))\n"
        "kept = {}\n"
        "with tracing.consumed('decide stop', 'sandboxctl.cmd.stop', {'traceparent': " + repr(PARENT) + ",\n"
        "                      'tracestate': 'vendor=abc'}):\n"
        "    tracing.inject(kept)\n"
        "print(kept.get('tracestate'))\n"
    )
    first, second = out.splitlines()
    keys, traceparent, logged = first.rsplit(" ", 2)
    assert keys == "['traceparent']" and traceparent == PARENT  # any case in, the W3C header out
    assert int(logged) < 1000  # the baggage was never read, so never logged
    assert second == "vendor=abc"  # a small tracestate goes on with its trace


def test_an_exporting_process_is_set_up_once_and_ends_within_its_patience_with_its_collector_silent() -> None:
    out = run(
        "import socket, time\n"
        "from sandboxctl.observe import tracing\n"
        "from opentelemetry import trace\n"
        "silent = socket.socket(); silent.bind(('127.0.0.1', 0)); silent.listen(100)\n"  # accepts, never answers
        "env = {'OTEL_EXPORTER_OTLP_ENDPOINT': f'http://127.0.0.1:{silent.getsockname()[1]}'}\n"
        "finish = tracing.setup('test', 1.0, env)\n"
        "print(tracing.setup('test', 1.0, env) is None)\n"
        "tracer = trace.get_tracer('test')\n"
        "for _ in range(3000):\n"
        "    tracer.start_span('s').end()\n"
        "began = time.monotonic(); finish(); print(round(time.monotonic() - began, 1))\n"
    )
    again, took = out.splitlines()
    assert again == "True"  # one provider per process
    assert float(took) < 2.0, took  # the SDK alone would wait up to 30 s


def test_a_cli_call_that_does_not_trace_imports_nothing_of_opentelemetry() -> None:
    out = run(
        "import asyncio, os, sys\n"
        "os.environ['SANDBOXCTL_NATS_URL'] = 'nats://127.0.0.1:9'\n"
        "from sandboxctl.cli.main import run_main\n"
        "print(asyncio.run(run_main(['stop', 'x'])), any(m.startswith('opentelemetry') for m in sys.modules))\n"
    )
    assert out.splitlines()[-1] == "8 False"
