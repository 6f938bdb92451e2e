"""The exception tree. Everything we raise derives from RLMError.

Every exception carries `code`, the gRPC status (by name) a server ends a call with when the
exception stops it (`service/status.py`; on a ClientError, the status the server answered
with), and `failure_kind`, the proto's FailureKind (as `events.CompletionFailed.kind` names
it) of the `failed` event a completion ends with when the exception stops it (`failures.py`);
"internal" (a bug on our side) where none is given.

                                code                  failure_kind       what
RLMError                        INTERNAL              internal           base
├── ConfigurationError          INVALID_ARGUMENT                         bad arguments
├── SandboxError                UNAVAILABLE           sandbox_error      not started, or lost
├── REPLExecutionError          INTERNAL              internal           the original's; unused
├── LMError                     from the HTTP status  lm_error           failed after retries
├── CompletionCancelledError    CANCELLED             cancelled          a client cancelled it
├── TraceStoreError             NOT_FOUND                                no store, no such trace
├── JournalError                UNAVAILABLE                              the journal store failed
├── ClientError                 the status received                      the server refused
│   ├── AuthenticationError     UNAUTHENTICATED, PERMISSION_DENIED
│   ├── InvalidRequestError     INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
│   │   └── NotFoundError       NOT_FOUND                                no such id, no such model
│   ├── ResourceExhaustedError  RESOURCE_EXHAUSTED                       too large, too many
│   └── ServerUnavailableError  UNAVAILABLE, DEADLINE_EXCEEDED           retryable
│       └── ServerShutdownError UNAVAILABLE           server_shutdown    retryable
└── LimitExceededError          RESOURCE_EXHAUSTED                       carries the partial answer
    ├── CompletionTimeoutError  DEADLINE_EXCEEDED     timeout            timeout_seconds...
    ├── CostLimitExceededError  RESOURCE_EXHAUSTED    cost_limit         max_cost
    ├── AnswerTooLargeError     RESOURCE_EXHAUSTED    answer_too_large   over max_answer_chars
    └── ContextWindowExceededError                    context_window     does not fit, compacted

A server's handlers refuse a call by raising the ClientError subclass for the status (the
first of its `codes` unless given, e.g. `InvalidRequestError(..., code="OUT_OF_RANGE")`); the SDK
raises the same class for it.

Whatever error ends a completion carries what the caller paid for (`CompletionLoop` fills it
in, the SDK rebuilds it from the `failed` event): `usage_summary`, `iterations`,
`partial_answer` (the best answer known) and `last_response` (the root model's last reply).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from rlm_orchestrator.types import UsageSummary


class RLMError(Exception):
    """Base of every error this package raises."""

    # The gRPC status (its name) a server ends a call with when this error stops it.
    code: str = "INTERNAL"
    # The proto's FailureKind, as `events.CompletionFailed.kind` names it, of a completion
    # that this error stops: "internal" (a bug on our side) unless a subclass says otherwise.
    failure_kind: ClassVar[str] = "internal"
    # What the completion this error stopped had done; unset on errors that stopped none.
    partial_answer: str | None = None
    usage_summary: UsageSummary | None = None
    iterations: int = 0
    last_response: str | None = None


class ConfigurationError(RLMError, ValueError):
    """The RLM was configured with something that cannot work."""

    code = "INVALID_ARGUMENT"


class SandboxError(RLMError):
    """A sandbox could not be started, or stopped answering."""

    code = "UNAVAILABLE"
    failure_kind = "sandbox_error"


class REPLExecutionError(RLMError):
    """Code failed in the REPL. Exported for code written against the original library; this
    package never raises it (a failing block is shown to the model, as in the original).

    `code` stays the gRPC status, as on every error here: the failed code is `source_code`."""

    def __init__(self, message: str, code: str | None = None, stderr: str | None = None):
        super().__init__(message)
        self.source_code = code
        self.stderr = stderr


class LMError(RLMError):
    """A root LM call failed for good (after retries). `status_code` is the provider's HTTP
    status, when known; `code` follows from it."""

    failure_kind = "lm_error"

    def __init__(self, message: str, *, model: str | None = None, status_code: int | None = None):
        super().__init__(message)
        self.model = model
        self.status_code = status_code
        if status_code == 429:
            self.code = "RESOURCE_EXHAUSTED"
        # 408 is a timeout: as transient as a 5xx, not the caller's fault.
        elif status_code is not None and 400 <= status_code < 500 and status_code != 408:
            self.code = "INVALID_ARGUMENT"
        else:
            self.code = "UNAVAILABLE"


class LimitExceededError(RLMError):
    """A limit stopped the run. `partial_answer` is the best answer known so far, if any."""

    code = "RESOURCE_EXHAUSTED"

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

    code = "DEADLINE_EXCEEDED"
    failure_kind = "timeout"

    def __init__(
        self,
        message: str,
        *,
        timeout_seconds: float | None = None,
        elapsed_seconds: float | None = None,
        **kwargs: object,
    ):
        # The numbers default to None (unknown), as in the original: a message alone is enough.
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.timeout_seconds = timeout_seconds
        self.elapsed_seconds = elapsed_seconds


class CostLimitExceededError(LimitExceededError):
    """Spend (the children's included) went over max_cost."""

    failure_kind = "cost_limit"

    def __init__(
        self,
        message: str,
        *,
        current_cost: float | None = None,
        cost_limit: float | None = None,
        **kwargs: object,
    ):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.current_cost = current_cost
        self.cost_limit = cost_limit


class ClientError(RLMError):
    """The orchestrator server refused or failed a call; `code` is the gRPC status name.

    `codes` are the statuses a subclass stands for: the SDK raises it for any of them, and a
    server handler raises it to answer with `code` (the first of them unless given)."""

    codes: ClassVar[tuple[str, ...]] = ("UNKNOWN",)

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code or self.codes[0]


class AuthenticationError(ClientError):
    """Missing or wrong credentials."""

    codes = ("UNAUTHENTICATED", "PERMISSION_DENIED")


class InvalidRequestError(ClientError):
    """The request was malformed, or named something that does not exist."""

    codes: ClassVar[tuple[str, ...]] = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE")


class NotFoundError(InvalidRequestError):
    """The call named something that does not exist (a completion, a session, a model).
    An InvalidRequestError too, as NOT_FOUND was before it had a class of its own."""

    codes: ClassVar[tuple[str, ...]] = ("NOT_FOUND",)


class ResourceExhaustedError(ClientError):
    """Too large (a context, a message) or too many (completions at once)."""

    codes = ("RESOURCE_EXHAUSTED",)


class ServerUnavailableError(ClientError):
    """The server could not be reached, is shutting down, or the deadline passed."""

    codes = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


class ServerShutdownError(ServerUnavailableError):
    """The server shut down (SIGTERM) before the completion ended: nothing was wrong with the
    request; retry it on another server, or on this one once it is back. `grace_seconds` is the
    server's shutdown grace (0 when the stream was cut without a `failed` event)."""

    failure_kind = "server_shutdown"

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

    code = "CANCELLED"
    failure_kind = "cancelled"

    def __init__(self, message: str, *, partial_answer: str | None = None):
        super().__init__(message)
        self.partial_answer = partial_answer


class AnswerTooLargeError(LimitExceededError):
    """The last FINAL_VAR answer (out of turns: no turn left to shorten it) is longer than
    max_answer_chars. Earlier in the run the model is told instead, and can shorten it."""

    failure_kind = "answer_too_large"


class ContextWindowExceededError(LimitExceededError):
    """Even with older turns compacted, the next request does not fit the root model's
    context window (`context_window`, in tokens). Nothing oversized was sent."""

    failure_kind = "context_window"

    def __init__(self, message: str, *, context_window: int | None = None, **kwargs: object):
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.context_window = context_window


class TraceStoreError(RLMError):
    """The trace store is missing or unreadable, or a trace id is unknown or ambiguous."""

    code = "NOT_FOUND"


class JournalError(RLMError):
    """The journal store failed (unreachable, full, corrupt): not a refused write, which is a
    ValueError, nor a missing id, a KeyError (journal/store.py)."""

    code = "UNAVAILABLE"
