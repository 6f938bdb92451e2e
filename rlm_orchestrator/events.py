"""Typed progress events of a completion, for the CLI, verbose output and the server stream.

`iteration` is the turn, counted from 1 (the console's "turn 1"; on the wire it counts from
0, as it always did: `convert/events.py` adds and takes away the 1); `block` is the index of a
code block within its turn, from 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlm_orchestrator.types import REPLResult, RLMChatCompletion, UsageSummary


@dataclass(frozen=True)
class TurnStarted:
    depth: int
    iteration: int
    seconds_left: float | None = None  # before this completion's timeout; None: it has none


@dataclass(frozen=True)
class RootResponse:
    depth: int
    iteration: int
    text: str
    duration: float
    finish_reason: str = "stop"  # "length": cut by the output limit


@dataclass(frozen=True)
class CodeBlockStarted:
    depth: int
    iteration: int
    block: int
    code: str


@dataclass(frozen=True)
class OutputChunk:
    depth: int
    iteration: int
    block: int
    stream: str  # "stdout" | "stderr"
    text: str


@dataclass(frozen=True)
class SubCallStarted:
    depth: int
    call_id: int
    kind: str  # "llm_query" | "rlm_query"
    model: str
    prompt_chars: int


@dataclass(frozen=True)
class SubCallFinished:
    depth: int
    call_id: int
    ok: bool
    response_chars: int
    duration: float
    error: str = ""
    truncated: bool = False  # cut by the sub-model's output limit, and marked so


@dataclass(frozen=True)
class CodeBlockFinished:
    depth: int
    iteration: int
    block: int
    result: REPLResult


@dataclass(frozen=True)
class Notice:
    """Something the model was told that a person watching should see too; or, from a
    server before the first turn, something the client should know (a max_cost that cannot
    be enforced: a model without a price)."""

    depth: int
    text: str


@dataclass(frozen=True)
class ContextCompacted:
    """Older turns were shortened so the next request fits the root model's window."""

    depth: int
    iteration: int
    stage: str  # "outputs" | "summary" | "dropped" | "cut" (compaction.py)
    tokens_before: int
    tokens_after: int
    context_window: int
    messages: int


@dataclass(frozen=True)
class UsageUpdated:
    depth: int
    usage: UsageSummary


@dataclass(frozen=True)
class FinalAnswer:
    depth: int
    answer: str
    source: str  # an AnswerSource (types.py): "final", "final_var", "out_of_turns", ...
    iterations: int


Event = (
    TurnStarted
    | RootResponse
    | CodeBlockStarted
    | OutputChunk
    | SubCallStarted
    | SubCallFinished
    | CodeBlockFinished
    | Notice
    | ContextCompacted
    | UsageUpdated
    | FinalAnswer
)
EventHandler = Callable[[Event], None]


def ignore_event(event: Event) -> None:
    """The default handler."""


# -- the ends of a completion as a client of the orchestrator service sees them -------------


@dataclass(frozen=True)
class CompletionStarted:
    completion_id: str
    session_id: str


@dataclass(frozen=True)
class CompletionFinished:
    result: RLMChatCompletion
    iterations: int


@dataclass(frozen=True)
class CompletionFailed:
    # "timeout" | "cost_limit" | "lm_error" | "sandbox_error" | "cancelled" | "internal" |
    # "server_shutdown" | "answer_too_large" | "context_window"
    kind: str
    message: str
    partial_answer: str | None
    usage: UsageSummary
    iterations: int
    # The timeout (s), max_cost (USD), shutdown grace (s) or max_answer_chars that was reached.
    limit: float = 0.0
    elapsed_seconds: float = 0.0
    status_code: int | None = None  # the LM provider's HTTP status, for "lm_error"
    last_response: str | None = None  # the root model's last response, when there was one


StreamEvent = Event | CompletionStarted | CompletionFinished | CompletionFailed
