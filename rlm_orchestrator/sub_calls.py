"""The code's sub-calls: `llm_query` to the router, `rlm_query` to a child RLM.

Each takes a slot (at most `max_concurrent` of a completion's run at once), is refused when the
budget is spent, and is told as events (started, finished, usage). What the child RLM is, and
how it starts, is the runner's (`spawn_child`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

from rlm_orchestrator import events as ev
from rlm_orchestrator import telemetry
from rlm_orchestrator.exceptions import LMError, RLMError
from rlm_orchestrator.router import LMRouter, UsageTracker
from rlm_orchestrator.sandbox import SubCallOutcome
from rlm_orchestrator.telemetry import metrics
from rlm_orchestrator.types import RLMChatCompletion, UsageSummary

# Ends an answer the sub-model's output limit cut: the code (and the model, when it prints
# it) can tell it is incomplete.
TRUNCATED_MARK = "\n[truncated: this answer reached the model's output limit of {limit} tokens]"

# (prompt, seconds left or None) -> the child RLM's result.
ChildSpawner = Callable[[str, float | None], Awaitable[RLMChatCompletion]]


class SubCalls:
    def __init__(
        self,
        depth: int,
        router: LMRouter,
        tracker: UsageTracker,
        emit: ev.EventHandler,
        max_concurrent: int,
        remaining_seconds: Callable[[], float | None],
    ) -> None:
        self.depth = depth
        self.router = router
        self.tracker = tracker
        self.emit = emit
        self.remaining_seconds = remaining_seconds
        self.spawn_child: ChildSpawner | None = None
        self._call_ids = itertools.count(1)
        self._slots = asyncio.Semaphore(max_concurrent)

    async def answer(
        self, prompts: list[str], model: str, kind: str, calls: list[RLMChatCompletion]
    ) -> list[SubCallOutcome]:
        """The answers to one request of the code, in its order; what each call returned is
        appended to `calls` (the block's `rlm_calls`)."""
        if len(prompts) == 1:  # llm_query: no task of its own needed
            return [await self._one(prompts[0], model, kind, calls)]
        return list(await asyncio.gather(*(self._one(p, model, kind, calls) for p in prompts)))

    async def _one(
        self, prompt: str, model: str, kind: str, calls: list[RLMChatCompletion]
    ) -> SubCallOutcome:
        async with self._slots:
            reason = self.tracker.over_budget()
            if reason is not None:
                return SubCallOutcome(error=f"not called: {reason}")
            call_id = next(self._call_ids)
            depth = self.depth
            child = kind == "rlm_query" and self.spawn_child is not None
            served_by = self.model_for(None if child else model)
            self.emit(ev.SubCallStarted(depth, call_id, kind, served_by, len(prompt)))
            started = time.perf_counter()
            if child:
                outcome = await self._child(call_id, prompt, calls)
            else:
                outcome = await self._lm(call_id, prompt, model, calls)
            metrics.sub_call(kind, served_by, outcome.error is None, time.perf_counter() - started)
            return outcome

    async def _lm(
        self, call_id: int, prompt: str, model: str, calls: list[RLMChatCompletion]
    ) -> SubCallOutcome:
        """llm_query: one call through the router."""
        depth = self.depth
        try:
            answer = await self.router.complete(
                prompt, model=model or None, depth=depth + 1, tracker=self.tracker
            )
        except LMError as exc:
            self.emit(ev.SubCallFinished(depth, call_id, False, 0, 0.0, str(exc)))
            return SubCallOutcome(error=str(exc))
        text = answer.text
        if answer.truncated:
            text += TRUNCATED_MARK.format(limit=answer.usage.total_output_tokens)
        calls.append(
            RLMChatCompletion(
                answer.model,
                prompt,
                text,
                UsageSummary({answer.model: answer.usage}),
                answer.duration,
            )
        )
        self.emit(
            ev.SubCallFinished(
                depth, call_id, True, len(text), answer.duration, truncated=answer.truncated
            )
        )
        self.emit(ev.UsageUpdated(depth, self.tracker.summary()))
        return SubCallOutcome(text=text, usage=UsageSummary({answer.model: answer.usage}))

    def model_for(self, named: str | None) -> str:
        """The model a sub-call goes to: the one the code named, else the router's for the
        next depth (a child RLM's root model too); an unknown name as is (the call fails)."""
        try:
            return self.router.resolve(named or None, self.depth + 1).model_name
        except LMError:
            return named or ""

    async def _child(
        self, call_id: int, prompt: str, calls: list[RLMChatCompletion]
    ) -> SubCallOutcome:
        """rlm_query: a child RLM with its own sandbox and loop answers."""
        assert self.spawn_child is not None
        depth = self.depth
        try:
            with telemetry.tracer().start_as_current_span(
                "rlm.rlm_query", attributes={"rlm.depth": depth, "rlm.prompt_chars": len(prompt)}
            ):
                child = await self.spawn_child(prompt, self.remaining_seconds())
        except RLMError as exc:
            error = f"child RLM failed: {type(exc).__name__}: {exc}"
            self.emit(ev.SubCallFinished(depth, call_id, False, 0, 0.0, error))
            return SubCallOutcome(error=error)
        calls.append(child)
        self.emit(
            ev.SubCallFinished(depth, call_id, True, len(child.response), child.execution_time)
        )
        self.emit(ev.UsageUpdated(depth, self.tracker.summary()))
        return SubCallOutcome(text=child.response, usage=child.usage_summary)
