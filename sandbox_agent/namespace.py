"""The REPL namespace user code runs in, and the helpers it finds there.

`llm_query` and friends block the calling thread on a request sent to the agent (and from
there on the execution's gRPC stream to the orchestrator). They never raise: failures come
back as strings starting with "Error:", as in the original library.
"""

from __future__ import annotations

import builtins
import itertools
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

from sandbox_agent.frames import BlockingChannel, Kind

HELPER_NAMES = (
    "llm_query",
    "llm_query_batched",
    "rlm_query",
    "rlm_query_batched",
    "FINAL_VAR",
    "SHOW_VARS",
)
LLM_QUERY, RLM_QUERY = "llm_query", "rlm_query"


class _Pending:
    __slots__ = ("done", "results")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.results: list[str] = []


class LlmBridge:
    """Sends sub-LM requests to the agent and hands answers back to the waiting threads."""

    def __init__(self, channel: BlockingChannel) -> None:
        self._channel = channel
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}

    def request(self, prompts: Sequence[str], model: str | None, kind: str) -> list[str]:
        pending = _Pending()
        with self._lock:
            request_id = next(self._ids)
            self._pending[request_id] = pending
        try:
            self._channel.send_json(
                Kind.LLM_REQUEST,
                {"id": request_id, "prompts": list(prompts), "model": model or "", "kind": kind},
            )
            pending.done.wait()
            return pending.results
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def deliver(self, answer: dict[str, Any]) -> None:
        with self._lock:
            pending = self._pending.get(int(answer["id"]))
        if pending is None:
            return  # the caller was interrupted and has gone
        pending.results = [str(result) for result in answer["results"]]
        pending.done.set()


def _as_prompt(value: object) -> str | None:
    return value if isinstance(value, str) else None


class Namespace:
    """A persistent globals dict plus the helpers, restored after every execution."""

    def __init__(self, bridge: LlmBridge) -> None:
        self._bridge = bridge
        self.globals: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.final_answer: str | None = None
        self._helpers: dict[str, Callable[..., Any]] = {
            "llm_query": self.llm_query,
            "llm_query_batched": self.llm_query_batched,
            "rlm_query": self.rlm_query,
            "rlm_query_batched": self.rlm_query_batched,
            "FINAL_VAR": self.final_var,
            "SHOW_VARS": self.show_vars,
        }
        self.restore_helpers()

    def restore_helpers(self) -> None:
        """Put back helpers that user code overwrote or deleted."""
        self.globals.update(self._helpers)
        self.globals["__builtins__"] = builtins

    def user_variables(self) -> list[tuple[str, str]]:
        """(name, type name) of what user code defined, in definition order; modules skipped."""
        return [
            (name, type(value).__name__)
            for name, value in self.globals.items()
            if not name.startswith("_")
            and name not in self._helpers
            and not isinstance(value, types.ModuleType)
        ]

    # -- helpers visible to user code ------------------------------------------------------

    def _query(self, prompts: list[object], model: object, kind: str) -> list[str]:
        if model is not None and not isinstance(model, str):
            return [f"Error: model must be a str or None, not {type(model).__name__}"] * len(
                prompts
            )
        texts = [_as_prompt(p) for p in prompts]
        valid = [t for t in texts if t is not None]
        answers = iter(self._bridge.request(valid, model, kind) if valid else [])
        return [
            next(answers, "Error: no answer")
            if t is not None
            else f"Error: prompt must be a str, not {type(p).__name__}"
            for t, p in zip(texts, prompts, strict=True)
        ]

    def llm_query(self, prompt: str, model: str | None = None) -> str:
        """Ask a sub-LM one prompt. Returns its answer, or a string starting with "Error:"."""
        return self._query([prompt], model, LLM_QUERY)[0]

    def llm_query_batched(self, prompts: list[str], model: str | None = None) -> list[str]:
        """Ask a sub-LM many prompts concurrently; answers come back in the same order."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            return [f"Error: prompts must be a list of str, not {type(prompts).__name__}"]
        return self._query(list(prompts), model, LLM_QUERY)

    def rlm_query(self, prompt: str) -> str:
        """Ask a child RLM (its own REPL) when depth allows; otherwise the same as llm_query."""
        return self._query([prompt], None, RLM_QUERY)[0]

    def rlm_query_batched(self, prompts: list[str]) -> list[str]:
        """rlm_query for many prompts, concurrently, answers in the same order."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            return [f"Error: prompts must be a list of str, not {type(prompts).__name__}"]
        return self._query(list(prompts), None, RLM_QUERY)

    def final_var(self, variable_name: object) -> str:
        """End the run with str() of a variable; returns that text (or an error string)."""
        if not isinstance(variable_name, str):
            # FINAL_VAR(answer) with the variable itself rather than its name: take the value.
            self.final_answer = str(variable_name)
            return self.final_answer
        name = variable_name.strip().strip("\"'")
        if name in self.globals and name not in self._helpers and not name.startswith("__"):
            self.final_answer = str(self.globals[name])
            return self.final_answer
        available = [n for n, _ in self.user_variables()]
        return (
            f"Error: Variable '{name}' not found. Available variables: {available}. "
            "Assign the variable in a repl block before calling FINAL_VAR on it."
        )

    def show_vars(self) -> str:
        """Describe the user variables and their types."""
        variables = dict(self.user_variables())
        if not variables:
            return "No variables created yet. Use ```repl``` blocks to create variables."
        return f"Available variables: {variables}"

    def lookup(self, raw_name: str) -> tuple[bool, Any]:
        name = raw_name.strip().strip("\"'")
        if name in self.globals and name not in self._helpers and not name.startswith("__"):
            return True, self.globals[name]
        return False, None
