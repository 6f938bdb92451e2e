"""Failure kinds <-> exceptions: how a failed completion crosses the wire, both ways.

A completion that fails ends with a `failed` event whose kind is the proto's FailureKind. The
server reports, for the exception that stopped it, the `failure_kind` the exception's class
carries (`exceptions.py`); the SDK raises, for a kind, what `RLM` would have raised in-process
(`_RAISED`, keyed by those same class attributes). In events (`events.CompletionFailed.kind`)
a kind is the enum value's name without its prefix, in lower case: FAILURE_KIND_COST_LIMIT is
"cost_limit".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlm_orchestrator.events import CompletionFailed
from rlm_orchestrator.exceptions import (
    AnswerTooLargeError,
    CompletionCancelledError,
    CompletionTimeoutError,
    ContextWindowExceededError,
    CostLimitExceededError,
    LMError,
    ResourceExhaustedError,
    RLMError,
    SandboxError,
    ServerShutdownError,
)
from rlm_wire.v1 import orchestrator_pb2 as pb

_PREFIX = "FAILURE_KIND_"
INTERNAL = RLMError.failure_kind


def _partial(failed: CompletionFailed) -> dict[str, Any]:
    return {
        "partial_answer": failed.partial_answer,
        "usage_summary": failed.usage,
        "iterations": failed.iterations,
    }


# What the SDK raises for each kind: the in-process exception, rebuilt from the event.
_RAISED: dict[str, Callable[[CompletionFailed], RLMError]] = {
    CompletionTimeoutError.failure_kind: lambda f: CompletionTimeoutError(
        f.message, timeout_seconds=f.limit, elapsed_seconds=f.elapsed_seconds, **_partial(f)
    ),
    CostLimitExceededError.failure_kind: lambda f: CostLimitExceededError(
        f.message, current_cost=f.usage.total_cost, cost_limit=f.limit, **_partial(f)
    ),
    LMError.failure_kind: lambda f: LMError(f.message, status_code=f.status_code),
    SandboxError.failure_kind: lambda f: SandboxError(f.message),
    CompletionCancelledError.failure_kind: lambda f: CompletionCancelledError(
        f.message, partial_answer=f.partial_answer
    ),
    ServerShutdownError.failure_kind: lambda f: ServerShutdownError(
        f.message, grace_seconds=f.limit, **_partial(f)
    ),
    # The server's max_answer_chars is a limit of the server's, refused as too large: the SDK
    # raises what it raises for RESOURCE_EXHAUSTED (README, "Answers of any size").
    AnswerTooLargeError.failure_kind: lambda f: ResourceExhaustedError(f.message),
    ContextWindowExceededError.failure_kind: lambda f: ContextWindowExceededError(
        f.message, context_window=int(f.limit) or None, **_partial(f)
    ),
    INTERNAL: lambda f: RLMError(f.message),
}


def failure_kind(exc: BaseException) -> str:
    """The kind of the `failed` event for the exception that stopped a completion."""
    return exc.failure_kind if isinstance(exc, RLMError) else INTERNAL


def kind_to_proto(kind: str) -> pb.FailureKind.ValueType:
    return pb.FailureKind.Value(_PREFIX + kind.upper())


def kind_from_proto(value: int) -> str:
    """The kind's name in events; "internal" for a value this SDK does not know (a newer
    server's) or none."""
    if value == pb.FAILURE_KIND_UNSPECIFIED or value not in pb.FailureKind.values():
        return INTERNAL
    return pb.FailureKind.Name(pb.FailureKind.ValueType(value)).removeprefix(_PREFIX).lower()


def exception_for(failed: CompletionFailed) -> RLMError:
    """The exception the in-process RLM would have raised for this failure. The server's
    message starts with the class name (for clients that read the event); the exception's own
    does not repeat it ("CompletionTimeoutError: CompletionTimeoutError: ..." once printed)."""
    raised = _RAISED.get(failed.kind, _RAISED[INTERNAL])(failed)
    # Whatever the kind, what the completion had done (exceptions.py).
    raised.usage_summary = failed.usage
    raised.iterations = failed.iterations
    if raised.partial_answer is None:
        raised.partial_answer = failed.partial_answer
    raised.last_response = failed.last_response
    prefix = f"{type(raised).__name__}: "
    if raised.args and isinstance(raised.args[0], str) and raised.args[0].startswith(prefix):
        raised.args = (raised.args[0].removeprefix(prefix), *raised.args[1:])
    return raised
