"""The exception tree. Everything we raise derives from RLMError.

RLMError
├── ConfigurationError          bad arguments (unknown backend, environment...)
├── SandboxError                a sandbox could not be started or was lost
├── LMError                     the root LM call failed (after retries)
├── CompletionCancelledError    a client cancelled the completion
├── ClientError                 the orchestrator server refused or failed a call
│   ├── AuthenticationError     UNAUTHENTICATED / PERMISSION_DENIED
│   ├── InvalidRequestError     INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION
│   ├── ResourceExhaustedError  RESOURCE_EXHAUSTED (too large, too many)
│   └── ServerUnavailableError  UNAVAILABLE, DEADLINE_EXCEEDED (retryable)
│       └── ServerShutdownError the server shut down before the completion ended (retryable)
└── LimitExceededError          a limit stopped the run; carries the partial answer
    ├── CompletionTimeoutError  timeout_seconds or iteration_timeout_seconds
    ├── CostLimitExceededError  max_cost
    └── AnswerTooLargeError     the final FINAL_VAR answer is over max_answer_chars
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlm_orchestrator.types import UsageSummary


class RLMError(Exception):
    """Base of every error this package raises."""


class ConfigurationError(RLMError, ValueError):
    """The RLM was configured with something that cannot work."""


class SandboxError(RLMError):
    """A sandbox could not be started, or stopped answering."""


class LMError(RLMError):
    """A root LM call failed for good (after retries)."""

    def __init__(self, message: str, *, model: str | None = None, status_code: int | None = None):
        super().__init__(message)
        self.model = model
        self.status_code = status_code


class LimitExceededError(RLMError):
    """A limit stopped the run. `partial_answer` is the best answer known so far, if any."""

    def __init__(
        self,
        message: str,
        *,
        partial_answer: str | None = None,
        usage_summary: UsageSummary | None = None,
        iterations: int = 0,
    ):
        super().__init__(message)
        self.partial_answer = partial_answer
        self.usage_summary = usage_summary
        self.iterations = iterations


class CompletionTimeoutError(LimitExceededError):
    """The completion (or one iteration) ran out of time."""

    def __init__(
        self, message: str, *, timeout_seconds: float, elapsed_seconds: float, **kwargs: object
    ):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.timeout_seconds = timeout_seconds
        self.elapsed_seconds = elapsed_seconds


class CostLimitExceededError(LimitExceededError):
    """Spend (the children's included) went over max_cost."""

    def __init__(self, message: str, *, current_cost: float, cost_limit: float, **kwargs: object):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.current_cost = current_cost
        self.cost_limit = cost_limit


class ClientError(RLMError):
    """The orchestrator server refused or failed a call; `code` is the gRPC status name."""

    def __init__(self, message: str, *, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


class AuthenticationError(ClientError):
    """Missing or wrong credentials."""


class InvalidRequestError(ClientError):
    """The request was malformed, or named something that does not exist."""


class ResourceExhaustedError(ClientError):
    """Too large (a context, a message) or too many (completions at once)."""


class ServerUnavailableError(ClientError):
    """The server could not be reached, is shutting down, or the deadline passed."""


class ServerShutdownError(ServerUnavailableError):
    """The server shut down (SIGTERM) before the completion ended: nothing was wrong with the
    request; retry it on another server, or on this one once it is back. `grace_seconds` is the
    server's shutdown grace (0 when the stream was cut without a `failed` event)."""

    def __init__(
        self,
        message: str,
        *,
        grace_seconds: float = 0.0,
        partial_answer: str | None = None,
        usage_summary: UsageSummary | None = None,
        iterations: int = 0,
    ):
        super().__init__(message, code="UNAVAILABLE")
        self.grace_seconds = grace_seconds
        self.partial_answer = partial_answer
        self.usage_summary = usage_summary
        self.iterations = iterations


class CompletionCancelledError(RLMError):
    """The completion was cancelled by a client (a server shutdown is ServerShutdownError)."""

    def __init__(self, message: str, *, partial_answer: str | None = None):
        super().__init__(message)
        self.partial_answer = partial_answer


class AnswerTooLargeError(LimitExceededError):
    """The last FINAL_VAR answer (out of turns: no turn left to shorten it) is longer than
    max_answer_chars. Earlier in the run the model is told instead, and can shorten it."""
