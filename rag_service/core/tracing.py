"""OpenTelemetry tracing: a span per RPC (api/rpc.py), per pipeline stage (core/timing.py StageTimer.stage) and per
shard call (the router's fan-out), continuing the caller's W3C trace context.

A server's provider comes from its creator (tests pass an SDK provider with an in-memory exporter), else from
`provider_from(config.tracing)` (OTLP when an endpoint is configured), else from `installed_provider()` (one the
embedding process set as OpenTelemetry's global provider). With none of them the server has no tracer and its RPCs
open no span at all: even the API's no-op span (extracting the caller's context, attaching a context) cost several
microseconds per call, measurable on a cache hit (bench/experiments/tracing_overhead.py). Such a server does not
forward its callers' trace context either.

The tracer of the request being served travels in a context variable that the RPC wrapper sets only when the RPC's
span records (the trace is sampled). Lower tiers ask `request_tracer()`: None means "not traced", and a stage then
costs one context-variable read; nothing builds a span or an attribute. Pipeline work runs on worker threads, and
executors do not carry contextvars across: `carry` binds a callable to the caller's context, so the worker's stage
spans find the RPC span as their parent.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from rag_service.core.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

TRACER_NAME = "rag_service"

T = TypeVar("T")

# The tracer of the RPC being served, None when its span does not record: read by stages and shard calls.
_request_tracer: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("rag_request_tracer", default=None)


def tracer(provider: TracerProvider) -> Tracer:
    """The rag_service tracer of `provider`."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def installed_provider() -> TracerProvider | None:
    """OpenTelemetry's global provider when the process installed one; None while it is the API's no-op default."""
    provider = trace.get_tracer_provider()
    return None if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)) else provider


def provider_from(config: TracingConfig) -> SdkTracerProvider | None:
    """An SDK provider batching spans to the OTLP/gRPC endpoint of `config`; None when no endpoint is configured.
    The caller owns it: `shutdown()` flushes what is still batched."""
    if config.otlp_endpoint is None:
        return None
    # Imported here: a server without an endpoint never loads the SDK.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = SdkTracerProvider(resource=Resource.create({SERVICE_NAME: config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    return provider


# request_tracer() -> the tracer of the request being served, or None when it is not traced. The variable's own
# method: called for every pipeline stage, it adds no Python frame.
request_tracer = _request_tracer.get


@contextmanager
def server_span(tracer: Tracer, service: str, method: str,
                metadata: Iterable[tuple[str, Any]] | None) -> Iterator[Span]:
    """The span of one RPC, current for its duration, whose parent is the W3C trace context (traceparent,
    tracestate) in the call's metadata. Exceptions are not recorded here: the RPC wrapper sets the status it answers."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}  # -bin values are bytes
    parent = propagate.extract(carrier)
    with tracer.start_as_current_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER,
                                      record_exception=False, set_status_on_exception=False) as span:
        recording = span.is_recording()
        if recording:
            span.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
        token = _request_tracer.set(tracer if recording else None)
        try:
            yield span
        finally:
            _request_tracer.reset(token)


def carry(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """`fn(*args)` bound to the caller's context (its current span and request tracer), to run on a worker thread."""
    return functools.partial(contextvars.copy_context().run, fn, *args)


def client_span(service: str, method: str, attributes: dict[str, Any]) -> Span | None:
    """A started (not current) span for an outgoing call, or None when the request is not traced; end it with
    `finish`."""
    tracer = _request_tracer.get()
    if tracer is None:
        return None
    return tracer.start_span(f"{service}/{method}", kind=SpanKind.CLIENT,
                             attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                                         **attributes})


def outgoing(metadata: tuple[tuple[str, str], ...] | None,
             span: Span | None) -> tuple[tuple[str, str], ...] | None:
    """`metadata` plus the W3C trace context of `span` (or, without one, of the current context), so the callee
    continues the trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=None if span is None else trace.set_span_in_context(span))
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())


def finish(span: Span, status_code: int, error: str | None = None) -> None:
    """Ends a client span with the call's gRPC status code (and, when it failed, why)."""
    span.set_attribute("rpc.grpc.status_code", status_code)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
