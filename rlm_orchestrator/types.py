"""Result and record types, field-compatible with the original library's."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from types import ModuleType
from typing import Any

Context = str | dict[str, Any] | list[Any]


def serialize_value(value: Any) -> Any:
    """A JSON-friendly rendering of any value, for logs."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, ModuleType):
        return f"<module '{value.__name__}'>"
    if isinstance(value, list | tuple):
        return [serialize_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): serialize_value(v) for k, v in value.items()}
    if callable(value):
        return f"<{type(value).__name__} '{getattr(value, '__name__', repr(value))}'>"
    try:
        return repr(value)
    except Exception:  # a broken __repr__ must not break logging
        return f"<{type(value).__name__}>"


@dataclass
class ModelUsageSummary:
    """Usage of one model: calls, tokens and cost in USD."""

    total_calls: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_cost: float = 0.0
    # Calls whose answer was cut by the output limit (finish_reason "length").
    truncated_calls: int = 0

    def add(self, other: ModelUsageSummary) -> None:
        self.total_calls += other.total_calls
        self.total_input_tokens += other.total_input_tokens
        self.total_output_tokens += other.total_output_tokens
        self.total_cost += other.total_cost
        self.truncated_calls += other.truncated_calls

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_calls": self.total_calls,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "total_cost": self.total_cost,
            "truncated_calls": self.truncated_calls,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelUsageSummary:
        return cls(
            total_calls=int(data.get("total_calls", 0)),
            total_input_tokens=int(data.get("total_input_tokens", 0)),
            total_output_tokens=int(data.get("total_output_tokens", 0)),
            total_cost=float(data.get("total_cost", 0.0)),
            truncated_calls=int(data.get("truncated_calls", 0)),
        )


@dataclass
class UsageSummary:
    """Usage per model name."""

    model_usage_summaries: dict[str, ModelUsageSummary] = field(default_factory=dict)

    @property
    def total_cost(self) -> float:
        return sum(u.total_cost for u in self.model_usage_summaries.values())

    @property
    def total_calls(self) -> int:
        return sum(u.total_calls for u in self.model_usage_summaries.values())

    def merge(self, other: UsageSummary) -> None:
        for model, usage in other.model_usage_summaries.items():
            self.model_usage_summaries.setdefault(model, ModelUsageSummary()).add(usage)

    def copy(self) -> UsageSummary:
        merged = UsageSummary()
        merged.merge(self)
        return merged

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_usage_summaries": {
                model: usage.to_dict() for model, usage in self.model_usage_summaries.items()
            },
            "total_cost": self.total_cost,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageSummary:
        return cls(
            {
                model: ModelUsageSummary.from_dict(usage)
                for model, usage in data.get("model_usage_summaries", {}).items()
            }
        )


class AnswerSource(StrEnum):
    """How a completion's answer was reached: RLMChatCompletion.answer_source, FinalAnswer
    events' `source`, CompletionFinished.answer_source on the wire (the same names)."""

    FINAL = "final"  # FINAL(text) in a root response
    FINAL_VAR = "final_var"  # FINAL_VAR(name) in a root response: the variable's value
    FINAL_VAR_IN_CODE = "final_var_in_code"  # FINAL_VAR(...) called by the code of a block
    ANSWER_DICT = "answer_dict"  # answer["ready"] = True (answer_convention="answer_dict")
    OUT_OF_TURNS = "out_of_turns"  # none within max_iterations: the reply to one last request
    PLAIN_LM = "plain_lm"  # at depth >= max_depth: one plain LM call, no REPL


ANSWER_SOURCES = tuple(source.value for source in AnswerSource)


@dataclass
class RLMChatCompletion:
    """What `RLM.completion` returns (and the record of one sub-LM call).

    The original's five fields, then two of ours: the root model's turns, and how the answer
    was reached (`answer_source`: one of ANSWER_SOURCES; "" for a sub-LM call's record)."""

    root_model: str
    prompt: Any
    response: str
    usage_summary: UsageSummary
    execution_time: float
    iterations: int = 0
    answer_source: str = ""

    @property
    def out_of_turns(self) -> bool:
        """No final answer within max_iterations: `response` is what the model said when
        asked for one after its last turn, not an answer it chose to give."""
        return self.answer_source == AnswerSource.OUT_OF_TURNS

    def to_dict(self) -> dict[str, Any]:
        return {
            "root_model": self.root_model,
            "prompt": serialize_value(self.prompt),
            "response": self.response,
            "usage_summary": self.usage_summary.to_dict(),
            "execution_time": self.execution_time,
            "iterations": self.iterations,
            "answer_source": self.answer_source,
        }


# A value in a trajectory log: longer renderings are cut (a context can be megabytes).
MAX_LOGGED_VALUE_CHARS = 2_000


def _logged(value: Any) -> Any:
    rendered = serialize_value(value)
    text = rendered if isinstance(rendered, str) else None
    if text is None:
        try:
            text = json.dumps(rendered, default=str)
        except (TypeError, ValueError, RecursionError):
            text = repr(rendered)
        if len(text) <= MAX_LOGGED_VALUE_CHARS:
            return rendered
    if len(text) <= MAX_LOGGED_VALUE_CHARS:
        return text
    cut = len(text) - MAX_LOGGED_VALUE_CHARS
    return f"{text[:MAX_LOGGED_VALUE_CHARS]}... [{cut} more characters]"


@dataclass(init=False)
class REPLResult:
    """The outcome of one code block, as the loop saw it.

    Built as the original's (`stdout, stderr, locals, execution_time, rlm_calls`), `locals`
    mapping names to values; or with `variables=`, names only: the values live in the
    sandbox, and the loop reads them back only for a trajectory log (`to_dict` gives None for
    a name without a value). `to_dict` renders values as the original does, each cut at
    MAX_LOGGED_VALUE_CHARS characters.
    """

    stdout: str
    stderr: str
    locals: dict[str, Any]
    execution_time: float | None
    rlm_calls: list[RLMChatCompletion]
    variables: list[str]
    status: str  # ok | error | timeout | worker_died | cancelled
    error: str
    truncated_chars: int
    final_answer: str | None
    worker_restarted: bool

    def __init__(
        self,
        stdout: str,
        stderr: str,
        locals: dict[str, Any] | list[str] | None = None,  # the original's name
        execution_time: float | None = None,
        rlm_calls: list[RLMChatCompletion] | None = None,
        *,
        variables: list[str] | None = None,
        status: str = "ok",
        error: str = "",
        truncated_chars: int = 0,
        final_answer: str | None = None,
        worker_restarted: bool = False,
    ) -> None:
        if isinstance(locals, list):  # names only (this class's earlier third field)
            variables, locals = locals if variables is None else variables, None
        self.stdout = stdout
        self.stderr = stderr
        self.locals = dict(locals) if locals is not None else {}
        self.variables = list(variables) if variables is not None else list(self.locals)
        self.execution_time = execution_time
        self.rlm_calls = list(rlm_calls or [])
        self.status = status
        self.error = error
        self.truncated_chars = truncated_chars
        self.final_answer = final_answer
        self.worker_restarted = worker_restarted

    @property
    def llm_calls(self) -> list[RLMChatCompletion]:
        """The original's other name for `rlm_calls`."""
        return self.rlm_calls

    def __str__(self) -> str:
        # The original's format, field for field (values unquoted).
        return (
            f"REPLResult(stdout={self.stdout}, stderr={self.stderr}, locals={self.locals}, "
            f"execution_time={self.execution_time}, rlm_calls={len(self.rlm_calls)})"
        )

    def to_dict(self) -> dict[str, Any]:
        shown = {name: _logged(value) for name, value in self.locals.items()}
        for name in self.variables:
            shown.setdefault(name, None)
        return {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "locals": shown,
            "execution_time": self.execution_time,
            "status": self.status,
            "error": self.error,
            "truncated_chars": self.truncated_chars,
            "final_answer": self.final_answer,
            "worker_restarted": self.worker_restarted,
            "rlm_calls": [call.to_dict() for call in self.rlm_calls],
        }


@dataclass
class CodeBlock:
    code: str
    result: REPLResult

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "result": self.result.to_dict()}


@dataclass
class RLMIteration:
    """One turn: the prompt sent to the root LM, its response, the blocks it ran."""

    prompt: Any
    response: str
    code_blocks: list[CodeBlock] = field(default_factory=list)
    final_answer: str | None = None
    iteration_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "response": self.response,
            "code_blocks": [block.to_dict() for block in self.code_blocks],
            "final_answer": self.final_answer,
            "iteration_time": self.iteration_time,
        }


@dataclass
class RLMMetadata:
    """The configuration of a run, the first line of a trajectory log (secrets removed)."""

    root_model: str
    max_depth: int
    max_iterations: int
    backend: str
    backend_kwargs: dict[str, Any]
    environment_type: str
    environment_kwargs: dict[str, Any]
    other_backends: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "root_model": self.root_model,
            "max_depth": self.max_depth,
            "max_iterations": self.max_iterations,
            "backend": self.backend,
            "backend_kwargs": serialize_value(self.backend_kwargs),
            "environment_type": self.environment_type,
            "environment_kwargs": serialize_value(self.environment_kwargs),
            "other_backends": self.other_backends,
        }
