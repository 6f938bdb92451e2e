"""rlm-orchestrator: Recursive Language Models whose REPL runs in sandbox agents over gRPC."""

from rlm_orchestrator.exceptions import (
    AnswerTooLargeError,
    CompletionTimeoutError,
    ConfigurationError,
    CostLimitExceededError,
    LimitExceededError,
    LMError,
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

__version__ = "0.1.0"

__all__ = [
    "RLM",
    "AnswerTooLargeError",
    "CodeBlock",
    "CompletionTimeoutError",
    "ConfigurationError",
    "CostLimitExceededError",
    "LMError",
    "LimitExceededError",
    "ModelUsageSummary",
    "REPLResult",
    "RLMChatCompletion",
    "RLMError",
    "RLMIteration",
    "RLMLogger",
    "RLMMetadata",
    "SandboxError",
    "UsageSummary",
    "__version__",
]
