"""The REPL namespace user code runs in, and the helpers it finds there.

`llm_query` and friends block the calling thread on a request sent to the agent (and from
there on the execution's gRPC stream to the orchestrator). They never raise: failures come
back as strings starting with "Error:", as in the original library.
"""

from __future__ import annotations

import builtins
import itertools
import json
import threading
import types
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # C-accelerated
from typing import Any

from sandbox_agent.frames import BlockingChannel, Kind
from sandbox_agent.limits import (
    MAX_MODEL_CHARS,
    MAX_PENDING_PROMPT_BYTES,
    MAX_PENDING_PROMPTS,
    MAX_PENDING_REQUESTS,
    MAX_PROMPTS_PER_REQUEST,
    MAX_REQUEST_BYTES,
)

HELPER_NAMES = (
    "llm_query",
    "llm_query_batched",
    "rlm_query",
    "rlm_query_batched",
    "FINAL_VAR",
    "SHOW_VARS",
)
LLM_QUERY, RLM_QUERY = "llm_query", "rlm_query"
# A request frame's bytes besides its prompts: the id, the model name (<= 256 characters, 6
# bytes each when escaped), the kind and the punctuation.
_ENVELOPE_BYTES = 2048


class _Pending:
    __slots__ = ("abandoned", "done", "prompts", "results", "size")

    def __init__(self, prompts: int, size: int) -> None:
        self.done = threading.Event()
        self.results: list[str] = []
        self.prompts = prompts
        self.size = size
        # The caller stopped waiting (interrupted): the answer is dropped when it comes.
        self.abandoned = False


class _InFlight:
    """The agent's bounds on sub-calls in flight, mirrored: legitimate code (many threads, a
    huge batch) waits here for room instead of getting refusals from the agent. Room comes
    back when an answer arrives, as it does in the agent."""

    def __init__(self) -> None:
        self._room = threading.Condition()
        self.requests = self.prompts = self.size = 0

    def _fits(self, prompts: int, size: int) -> bool:
        return (
            self.requests < MAX_PENDING_REQUESTS
            and self.prompts + prompts <= MAX_PENDING_PROMPTS
            and self.size + size <= MAX_PENDING_PROMPT_BYTES
        )

    def acquire(self, prompts: int, size: int) -> None:
        with self._room:
            while not self._fits(prompts, size):
                self._room.wait()
            self.requests, self.prompts, self.size = (
                self.requests + 1,
                self.prompts + prompts,
                self.size + size,
            )

    def release(self, prompts: int, size: int) -> None:
        with self._room:
            self.requests, self.prompts, self.size = (
                self.requests - 1,
                self.prompts - prompts,
                self.size - size,
            )
            self._room.notify_all()


def _encoded_prompt(prompt: str) -> bytes:
    # A JSON string in UTF-8 (compact, unlike \u escapes). Lone surrogates cannot travel
    # (gRPC strings are UTF-8): "?" instead, one for one.
    return encode_basestring(prompt).encode("utf-8", "replace")


class LlmBridge:
    """Sends sub-LM requests to the agent and hands answers back to the waiting threads.

    A batch is sent as several requests when it exceeds what one request may carry (prompts,
    bytes: see limits.py); a prompt too big for any request gets an "Error:" string.
    """

    def __init__(self, channel: BlockingChannel) -> None:
        self._channel = channel
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._in_flight = _InFlight()

    def request(self, prompts: Sequence[str], model: str | None, kind: str) -> list[str]:
        model = model or ""
        if len(model) > MAX_MODEL_CHARS:
            return [f"Error: a model name has at most {MAX_MODEL_CHARS} characters"] * len(prompts)
        results: list[str] = ["Error: no answer"] * len(prompts)
        # The common case, in one C call: the whole batch fits one request.
        array = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
        body = array.encode("utf-8", "replace")  # lone surrogates: "?" (gRPC needs UTF-8)
        if (
            len(body) + _ENVELOPE_BYTES <= MAX_REQUEST_BYTES
            and len(prompts) <= MAX_PROMPTS_PER_REQUEST
        ):
            batches = [(list(range(len(prompts))), body)]
        else:
            batches = [
                ([index for index, _ in group], b"[" + b",".join(e for _, e in group) + b"]")
                for group in self._split([_encoded_prompt(p) for p in prompts], results)
                if group
            ]
        sent: list[tuple[list[int], _Pending]] = []
        try:
            for indices, batch in batches:
                sent.append((indices, self._send(batch, len(indices), model, kind)))
            for indices, pending in sent:
                pending.done.wait()
                for index, result in zip(indices, pending.results, strict=False):
                    results[index] = result
        finally:
            with self._lock:
                for _, pending in sent:
                    pending.abandoned = not pending.done.is_set()
        return results

    @staticmethod
    def _split(encoded: list[bytes], results: list[str]) -> list[list[tuple[int, bytes]]]:
        """Requests within the per-request bounds; a prompt too big for any gets its error."""
        groups: list[list[tuple[int, bytes]]] = [[]]
        group_size = _ENVELOPE_BYTES
        for index, prompt in enumerate(encoded):
            if len(prompt) + _ENVELOPE_BYTES > MAX_REQUEST_BYTES:
                results[index] = (
                    f"Error: the prompt has {len(prompt)} bytes encoded, more than one sub-call "
                    f"can carry ({MAX_REQUEST_BYTES} bytes)"
                )
                continue
            if groups[-1] and (
                group_size + len(prompt) + 1 > MAX_REQUEST_BYTES
                or len(groups[-1]) >= MAX_PROMPTS_PER_REQUEST
            ):
                groups.append([])
                group_size = _ENVELOPE_BYTES
            groups[-1].append((index, prompt))
            group_size += len(prompt) + 1
        return groups

    def _send(self, prompts: bytes, count: int, model: str, kind: str) -> _Pending:
        """One request frame (`prompts`: a JSON array of `count` strings), once there is room
        in flight for it."""
        request_id = next(self._ids)
        payload = b"".join(
            (
                b'{"id":%d,"prompts":' % request_id,
                prompts,
                b',"model":',
                json.dumps(model).encode(),
                b',"kind":',
                json.dumps(kind).encode(),
                b"}",
            )
        )
        pending = _Pending(count, len(payload))
        self._in_flight.acquire(pending.prompts, pending.size)
        sent = False
        try:
            with self._lock:
                self._pending[request_id] = pending
            self._channel.send(Kind.LLM_REQUEST, payload)
            sent = True
        finally:
            if not sent:
                with self._lock:
                    self._pending.pop(request_id, None)
                self._in_flight.release(pending.prompts, pending.size)
        return pending

    def deliver(self, answer: dict[str, Any]) -> None:
        with self._lock:
            pending = self._pending.pop(int(answer["id"]), None)
        if pending is None:
            return  # not ours (the agent answers every request of an execution at its end)
        self._in_flight.release(pending.prompts, pending.size)
        if pending.abandoned:
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
            self.final_answer = str.__str__(str(variable_name))
            return self.final_answer
        name = variable_name.strip().strip("\"'")
        if name in self.globals and name not in self._helpers and not name.startswith("__"):
            # An exact str (a subclass could lie about its length); read later in chunks.
            self.final_answer = str.__str__(str(self.globals[name]))
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
