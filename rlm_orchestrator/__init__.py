"""rlm-orchestrator: Recursive Language Models whose REPL runs in sandbox agents over gRPC.

The public names are loaded on first use (PEP 562): importing a submodule (the CLI's
argument checks, the configuration) does not pay for the RLM's whole module graph
(grpc, protobuf, opentelemetry: about half a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# One version for the distribution, written in the agent's package (the lowest layer).
from sandbox_agent import __version__

if TYPE_CHECKING:
    from rlm_orchestrator.budget import UnpricedModelWarning
    from rlm_orchestrator.exceptions import (
        AnswerTooLargeError,
        CompletionTimeoutError,
        ConfigurationError,
        ContextWindowExceededError,
        CostLimitExceededError,
        LimitExceededError,
        LMError,
        REPLExecutionError,
        RLMError,
        SandboxError,
    )
    from rlm_orchestrator.logger import RLMLogger
    from rlm_orchestrator.rlm import RLM
    from rlm_orchestrator.types import (
        CodeBlock,
        ModelUsageSummary,
        REPLResult,
        RLMChatCompletion,
        RLMIteration,
        RLMMetadata,
        UsageSummary,
    )

# Public name -> the module that defines it.
_EXPORTS = {
    "AnswerTooLargeError": "exceptions",
    "CompletionTimeoutError": "exceptions",
    "ConfigurationError": "exceptions",
    "ContextWindowExceededError": "exceptions",
    "CostLimitExceededError": "exceptions",
    "LimitExceededError": "exceptions",
    "LMError": "exceptions",
    "REPLExecutionError": "exceptions",
    "RLMError": "exceptions",
    "SandboxError": "exceptions",
    "RLMLogger": "logger",
    "RLM": "rlm",
    "CodeBlock": "types",
    "ModelUsageSummary": "types",
    "REPLResult": "types",
    "RLMChatCompletion": "types",
    "RLMIteration": "types",
    "RLMMetadata": "types",
    "UsageSummary": "types",
    "UnpricedModelWarning": "budget",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "RLM",
    "AnswerTooLargeError",
    "CodeBlock",
    "CompletionTimeoutError",
    "ConfigurationError",
    "ContextWindowExceededError",
    "CostLimitExceededError",
    "LMError",
    "LimitExceededError",
    "ModelUsageSummary",
    "REPLExecutionError",
    "REPLResult",
    "RLMChatCompletion",
    "RLMError",
    "RLMIteration",
    "RLMLogger",
    "RLMMetadata",
    "SandboxError",
    "UnpricedModelWarning",
    "UsageSummary",
    "__version__",
]
