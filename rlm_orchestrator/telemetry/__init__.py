"""Traces of completions across the orchestrator, the LM router and the sandbox agents.

The functions load with their first use (PEP 562): the CLI imports this package for
`rlm-orchestrator trace` and must not pay for opentelemetry and protobuf before it has checked
`run`'s arguments.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlm_orchestrator.telemetry.tracing import (
        TraceContextFilter,
        configure,
        content,
        context_from,
        enabled,
        export_agent_span,
        flush,
        mark_error,
        record_content,
        recording,
        shutdown,
        traceparent,
        tracer,
    )


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.tracing"), name)
    globals()[name] = value  # found directly from now on
    return value


__all__ = [
    "TraceContextFilter",
    "configure",
    "content",
    "context_from",
    "enabled",
    "export_agent_span",
    "flush",
    "mark_error",
    "record_content",
    "recording",
    "shutdown",
    "traceparent",
    "tracer",
]
