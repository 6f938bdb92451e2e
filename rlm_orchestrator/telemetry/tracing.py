"""OpenTelemetry for the orchestrator: set-up from OTEL_* variables, helpers for our spans.

Tracing is on when `OTEL_TRACES_EXPORTER` names exporters (`otlp`, `console`; the OTLP
protocol and endpoint come from the standard OTEL_EXPORTER_OTLP_* variables) or when
`RLM_TRACE_STORE` names a local SQLite store (read by `rlm-orchestrator trace`). Otherwise
nothing is configured: the API's no-op tracer stays, and no thread or file is created.

Agent spans arrive finished inside execution results (sandboxes have no network); they are
handed to the same span processors as ours, with the agent's own resource.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from rlm_wire.v1 import sandbox_pb2

TRACER_NAME = "rlm_orchestrator"
CONTENT_ENV = "RLM_TRACE_CONTENT"
STORE_ENV = "RLM_TRACE_STORE"
MAX_CONTENT_CHARS = 2000
STORE_DELAY_MS = 1000
_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_state: dict[str, Any] = {"configured": False, "provider": None, "processors": []}


def configure(store_path: Path | None = None, *, metrics_listen: str | None = None) -> bool:
    """Set up the global tracer provider once, from the environment, and the meter provider
    (metrics.py; `metrics_listen`: a Prometheus scrape endpoint). True when tracing is on."""
    from rlm_orchestrator.telemetry import metrics

    metrics.configure(metrics_listen)
    with _lock:
        if _state["configured"]:
            return _state["provider"] is not None
        _state["configured"] = True
        names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
        names = [n for n in names if n and n != "none"]
        store = store_path or (Path(os.environ[STORE_ENV]) if os.environ.get(STORE_ENV) else None)
        if not names and store is None:
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        service = os.environ.get("OTEL_SERVICE_NAME", "rlm-orchestrator")
        # The pid tells replicas (and the viewers' process tracks) apart.
        resource = Resource.create({"service.name": service, "process.pid": os.getpid()})
        provider = TracerProvider(resource=resource)
        processors = [BatchSpanProcessor(_exporter(name)) for name in names]
        if store is not None:
            from rlm_orchestrator.telemetry.store import SqliteSpanExporter

            # Every second (not the SDK's 5 s) unless OTEL_BSP_SCHEDULE_DELAY says: a local
            # file is cheap to write, and `rlm-orchestrator ui` shows a running completion live.
            delay = None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else STORE_DELAY_MS
            processors.append(
                BatchSpanProcessor(SqliteSpanExporter(store), schedule_delay_millis=delay)
            )
        for processor in processors:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        _state["provider"], _state["processors"] = provider, processors
        return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r} (otlp, console)")
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def enabled() -> bool:
    return _state["provider"] is not None


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def recording() -> bool:
    """Whether spans go anywhere: a tracer provider is set (by `configure`, or by the
    application that uses us). Else a hot path may skip even the API's no-op spans."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


async def flush() -> None:
    """Export what is buffered (at the end of a completion), off the event loop."""
    provider = _state["provider"]
    if provider is not None:
        await asyncio.to_thread(provider.force_flush, 5000)


def shutdown() -> None:
    """Flush and stop the exporters (what the SDK would otherwise do at interpreter exit)."""
    from rlm_orchestrator.telemetry import metrics

    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()
    metrics.shutdown()


class TraceContextFilter(logging.Filter):
    """Gives each record `trace_id` and `span_id` (of the span current where it was logged;
    "-" outside one), for a log format that shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        valid = context.is_valid
        record.trace_id = format(context.trace_id, "032x") if valid else "-"
        record.span_id = format(context.span_id, "016x") if valid else "-"
        return True


def record_content() -> bool:
    """Code, prompts and outputs go into spans only when RLM_TRACE_CONTENT says so."""
    return os.environ.get(CONTENT_ENV, "").lower() in ("1", "true", "yes")


def content(text: str) -> str:
    return text if len(text) <= MAX_CONTENT_CHARS else text[:MAX_CONTENT_CHARS] + "…"


def traceparent(span: Span | None = None) -> str:
    """The W3C traceparent of `span` (default: the current one); empty when not recording."""
    span = span or trace.get_current_span()
    if not span.get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def context_from(traceparent_value: str) -> Context | None:
    """The context whose parent is the span named by a W3C traceparent (None if invalid)."""
    if not traceparent_value:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent_value})


def mark_error(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def export_agent_span(record: sandbox_pb2.AgentSpan) -> None:
    """Hand a span recorded in a sandbox to our processors, as the agent's own span."""
    processors = _state["processors"]
    if not processors or not record.span_id:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, TraceFlags

    def context_of(span_id: str) -> SpanContext:
        return SpanContext(int(record.trace_id, 16), int(span_id, 16), is_remote=True,
                           trace_flags=TraceFlags(TraceFlags.SAMPLED))  # fmt: skip

    span = ReadableSpan(
        name=record.name,
        context=context_of(record.span_id),
        parent=context_of(record.parent_span_id) if record.parent_span_id else None,
        resource=Resource.create(dict(record.resource)),
        attributes=dict(record.attributes),
        kind=SpanKind.SERVER,
        status=Status(StatusCode.ERROR, record.error) if record.error else Status(StatusCode.OK),
        start_time=record.start_unix_nano,
        end_time=record.end_unix_nano,
        instrumentation_scope=InstrumentationScope("sandbox_agent"),
    )
    for processor in processors:
        processor.on_end(span)
