"""Usage accounting between the library's dataclasses and the rlm.v1 usage messages."""

from __future__ import annotations

from rlm_orchestrator.types import ModelUsageSummary, UsageSummary
from rlm_wire.v1 import usage_pb2


def model_usage_to_proto(name: str, usage: ModelUsageSummary) -> usage_pb2.ModelUsage:
    return usage_pb2.ModelUsage(
        model=name,
        calls=usage.total_calls,
        input_tokens=usage.total_input_tokens,
        output_tokens=usage.total_output_tokens,
        cost=usage.total_cost,
        truncated_calls=usage.truncated_calls,
    )


def model_usage_from_proto(usage: usage_pb2.ModelUsage) -> ModelUsageSummary:
    return ModelUsageSummary(
        usage.calls, usage.input_tokens, usage.output_tokens, usage.cost, usage.truncated_calls
    )


def usage_to_proto(summary: UsageSummary) -> usage_pb2.UsageSummary:
    return usage_pb2.UsageSummary(
        models=[model_usage_to_proto(n, u) for n, u in summary.model_usage_summaries.items()],
        total_cost=summary.total_cost,
    )


def usage_from_proto(summary: usage_pb2.UsageSummary) -> UsageSummary:
    """The per-model usage; `total_cost` is recomputed from it, and repeated models are summed."""
    result = UsageSummary()
    for usage in summary.models:
        result.model_usage_summaries.setdefault(usage.model, ModelUsageSummary()).add(
            model_usage_from_proto(usage)
        )
    return result
