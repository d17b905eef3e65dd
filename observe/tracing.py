"""Traces: OpenTelemetry spans along a command's way through sandboxctl, and the W3C trace context
(``traceparent``, ``tracestate``) carried in NATS headers from hop to hop.

The way of a stop, span by span: the caller's ``send stop`` (the SDK's; the CLI's call
``sandboxctl stop`` above it) puts its context in the command's headers; the state machine's
``decide stop`` continues it, and its append puts it in the event's headers, stored in the log
with the event; the worker's ``work <event type>`` continues it from there, around the engine call
(``engine podman.stop``), and its fact carries it on; the state machine's ``react <fact type>``
continues it into the phase event's headers; the projector's ``project`` spans end it, one per
event. Another service that sends a command with a trace context of its own sees its trace go on
through sandboxctl; a reader of the log finds each event's context in its headers.

A process traces once it is set up to export (``setup``: OTLP over HTTP, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, as every
OpenTelemetry SDK reads them), or when a message reaches it with a context (then, without an
exporter of its own, it passes that context on unchanged). An application that imported
OpenTelemetry itself has its context carried by the SDK's calls. Nothing of OpenTelemetry is
imported otherwise: a CLI call that does not trace pays nothing for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanKind

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # the W3C trace context's header
TRACESTATE = "tracestate"  # vendors' entries beside it: passed on only up to TRACESTATE_MAX characters
TRACESTATE_MAX = 512  # a sender's tracestate is copied into every event its command causes, in the log
TRACER = "sandboxctl"
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_exporting = False  # set up with an exporter: every hop makes a span, with or without a context


def loaded() -> bool:
    """Whether this process uses OpenTelemetry (set up here, or imported by the application)."""
    return _exporting or "opentelemetry.trace" in sys.modules


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces to be exported, as OpenTelemetry's SDKs read it."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_ENVS)


def setup(
    service: str, patience: float, environ: Mapping[str, str] = os.environ, quiet: bool = False
) -> Callable[[], None] | None:
    """Export this process's spans with OTLP over HTTP (``http/protobuf``) when the environment
    asks for it: the endpoint, headers and batching are the SDK's ``OTEL_*`` settings, and
    ``service.name`` is ``OTEL_SERVICE_NAME`` or ``service``. What to call at exit, or None when
    nothing is exported (or this process is set up already: one provider per process).

    What is called at exit sends what is left, and returns within ``patience`` seconds whatever
    the collector does (each export tries for ``patience`` too): a process whose collector is
    away ends that much later, never after the SDK's own 10 s of retries or 30 s of shutdown.
    ``quiet`` (a CLI call) leaves out the exporter's warnings between retries: its last word,
    the spans it gave up on, is one line."""
    global _exporting
    if _exporting or not wanted(environ):
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol and protocol != "http/protobuf":
        log.warning("traces: OTLP protocol %r is not supported; sending http/protobuf", protocol)
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME") or service})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # ours to call, bounded
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=patience)))
    if quiet:
        logging.getLogger("opentelemetry.exporter.otlp.proto.http").setLevel(logging.ERROR)
    trace.set_tracer_provider(provider)
    _exporting = True

    def finish() -> None:
        # On a daemon thread of its own, waited for ``patience`` at most: the SDK's shutdown
        # joins its exporting thread for up to 30 s, and a thread pool's would be joined at exit.
        ending = threading.Thread(target=provider.shutdown, name="sandboxctl-traces-shutdown", daemon=True)
        ending.start()
        ending.join(patience)

    return finish


def endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """Where spans go, as the banner says it: the traces' own endpoint, or the OTLP one's."""
    for name in ENDPOINT_ENVS:
        if environ.get(name, "").strip():
            return environ[name].strip()
    return ""


def _propagator() -> Any:
    """The W3C trace context's propagator, whatever the process's global one is (an application's
    B3, OTEL_PROPAGATORS): sandboxctl's hops speak ``traceparent`` and nothing else. Baggage is
    never read from a message nor passed on."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def inject(headers: dict[str, str]) -> None:
    """Put the current trace context into ``headers`` (nothing when there is none)."""
    if not loaded():
        return
    _propagator().inject(headers)
    state = headers.get(TRACESTATE)
    if state is not None and len(state) > TRACESTATE_MAX:
        del headers[TRACESTATE]  # a sender's vendors' entries are not the log's to keep


def _kind(name: str) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return SpanKind[name.upper()]


@contextlib.contextmanager
def sending(name: str, **attributes: Any) -> Iterator[None]:
    """A span of the caller's own (the SDK's or the CLI's) around a request, current within it,
    so ``inject`` puts it in the request's headers. Nothing when this process does not trace."""
    if not loaded():
        yield
        return
    from opentelemetry import trace

    with trace.get_tracer(TRACER).start_as_current_span(name, kind=_kind("client"), attributes=attributes):
        yield


def carried(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The W3C trace context in a message's ``headers`` and nothing else: ``traceparent`` (its
    name in any case, as HTTP-minded publishers write it), and ``tracestate`` up to
    TRACESTATE_MAX characters. Whatever else a publisher put there is never handed to
    OpenTelemetry, which would log an oversized header in full."""
    if not headers:
        return {}
    found: dict[str, str] = {}
    for key, value in headers.items():
        lowered = key.lower()
        if lowered == TRACEPARENT:
            found[TRACEPARENT] = value[:64]  # 55 characters when it is one
        elif lowered == TRACESTATE and len(value) <= TRACESTATE_MAX:
            found[TRACESTATE] = value
    return found if TRACEPARENT in found else {}


def _parent(headers: Mapping[str, str] | None) -> Any:
    """The context carried by ``headers``, or None when they carry none and this process does not
    export (then no span is made at all)."""
    context = carried(headers)
    if not (context or _exporting):
        return None
    return _propagator().extract(context)


@contextlib.contextmanager
def consumed(name: str, subject: str, headers: Mapping[str, str] | None) -> Iterator[None]:
    """A span for handling the message on ``subject``, continuing the context in its ``headers``
    and current within, so what the handling publishes carries it on."""
    parent = _parent(headers)
    if parent is None:
        yield
        return
    from opentelemetry import trace

    # Without a provider here, OpenTelemetry's no-op span carries the caller's context on unchanged.
    tracer = trace.get_tracer(TRACER)
    with tracer.start_as_current_span(name, context=parent, kind=_kind("consumer"), attributes=about(subject)):
        yield


def about(subject: str) -> dict[str, str]:
    """A message's attributes, in OpenTelemetry's messaging conventions."""
    return {"messaging.system": "nats", "messaging.destination.name": subject}


@contextlib.contextmanager
def step(name: str, **attributes: Any) -> Iterator[None]:
    """A span for a step within the current one (an engine call); nothing outside a trace."""
    if not loaded():
        yield
        return
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        yield
        return
    with trace.get_tracer(TRACER).start_as_current_span(name, kind=_kind("internal"), attributes=attributes):
        yield


def begin(name: str, subject: str, headers: Mapping[str, str] | None) -> Span | None:
    """A span for one message of a batch, continuing its context; the caller ends it once the
    batch is done (``Span.end``). None when there is nothing to trace."""
    parent = _parent(headers)
    if parent is None:
        return None
    from opentelemetry import trace

    return trace.get_tracer(TRACER).start_span(name, context=parent, kind=_kind("consumer"), attributes=about(subject))
