"""Traces of completions across the orchestrator, the LM router and the sandbox agents."""

from rlm_orchestrator.telemetry.tracing import (
    configure,
    content,
    context_from,
    enabled,
    export_agent_span,
    flush,
    mark_error,
    record_content,
    shutdown,
    traceparent,
    tracer,
)

__all__ = [
    "configure",
    "content",
    "context_from",
    "enabled",
    "export_agent_span",
    "flush",
    "mark_error",
    "record_content",
    "shutdown",
    "traceparent",
    "tracer",
]
