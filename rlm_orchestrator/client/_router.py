"""The server's LMRouter service (rlm.v1.LMRouter) as the SDK returns it: plain dataclasses.

The server makes the LM call with its own keys and limits (per-model concurrency, retries);
the client names a registered model, or none (then depth picks the root or the sub model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlm_orchestrator.convert.usage import model_usage_from_proto, usage_from_proto
from rlm_orchestrator.exceptions import InvalidRequestError, LMError
from rlm_orchestrator.types import ModelUsageSummary, UsageSummary
from rlm_wire.v1 import lm_router_pb2 as pb

# A prompt: one user message, or a whole conversation ({"role": ..., "content": ...} each).
Prompt = str | Sequence[dict[str, str]]


@dataclass(frozen=True)
class ModelInfo:
    """A model the server's router can call (its key is never shown)."""

    name: str  # what callers use
    backend: str  # the original library's backend name (openai, anthropic, ...)
    litellm_model: str
    max_concurrency: int


@dataclass(frozen=True)
class ModelList:
    models: list[ModelInfo]
    root_model: str  # answers depth 0 when a call names no model
    sub_model: str  # answers depth >= 1


@dataclass(frozen=True)
class LMCompletion:
    """One LM answer from the router."""

    text: str
    model: str  # the registered name of the model that answered
    usage: ModelUsageSummary
    duration_seconds: float  # retries included
    attempts: int  # 1: no retry


@dataclass(frozen=True)
class LMBatch:
    """The answers of a batch in the order of its prompts: an LMError where a prompt failed
    (the others still succeed)."""

    results: list[LMCompletion | LMError]
    usage: UsageSummary  # of the successful ones


def request(prompt: Prompt, model: str | None, depth: int) -> pb.LMRequest:
    if isinstance(prompt, str):
        return pb.LMRequest(prompt=prompt, model=model or "", depth=depth)
    if not all(isinstance(m, dict) for m in prompt):
        raise InvalidRequestError("a conversation is a list of {'role': ..., 'content': ...}")
    messages = [
        pb.ChatMessage(role=m.get("role", ""), content=m.get("content", "")) for m in prompt
    ]
    return pb.LMRequest(
        conversation=pb.Conversation(messages=messages), model=model or "", depth=depth
    )


def batch_request(prompts: Sequence[str], model: str | None, depth: int) -> pb.LMBatchRequest:
    return pb.LMBatchRequest(prompts=list(prompts), model=model or "", depth=depth)


def completion_from_proto(response: pb.LMResponse) -> LMCompletion:
    return LMCompletion(
        response.text,
        response.model,
        model_usage_from_proto(response.usage),
        response.duration_seconds,
        response.attempts,
    )


def batch_from_proto(response: pb.LMBatchResponse, model: str | None) -> LMBatch:
    results: list[LMCompletion | LMError] = [
        completion_from_proto(r.response)
        if r.WhichOneof("outcome") == "response"
        else LMError(r.error, model=model)
        for r in response.results
    ]
    return LMBatch(results, usage_from_proto(response.usage))


def models_from_proto(response: pb.ListModelsResponse) -> ModelList:
    models = [
        ModelInfo(m.name, m.backend, m.litellm_model, m.max_concurrency) for m in response.models
    ]
    return ModelList(models, response.root_model, response.sub_model)
