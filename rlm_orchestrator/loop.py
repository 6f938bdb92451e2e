"""The RLM loop: root LM turn -> run its ```repl blocks in the sandbox -> final answer?

One CompletionLoop runs one completion against one sandbox session. It is asyncio
throughout; `RLM` (rlm.py) is the synchronous facade and owns the sandbox's lifetime.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator import events as ev
from rlm_orchestrator import telemetry
from rlm_orchestrator.answers import AnswerRead, read_answer
from rlm_orchestrator.blocks import BlockRunner
from rlm_orchestrator.compaction import ContextBudget, Conversation, Turn
from rlm_orchestrator.config.answer import FINAL, AnswerConvention
from rlm_orchestrator.config.fences import DEFAULT_CODE_FENCES
from rlm_orchestrator.config.limits import (
    DEFAULT_MAX_ANSWER_CHARS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ITERATIONS,
    SandboxLimits,
)
from rlm_orchestrator.context_window import ContextOverflowError
from rlm_orchestrator.exceptions import (
    AnswerTooLargeError,
    CompletionTimeoutError,
    ContextWindowExceededError,
    CostLimitExceededError,
    RLMError,
)
from rlm_orchestrator.journal.recorder import CompletionJournal, JournaledLM
from rlm_orchestrator.logger import RLMLogger
from rlm_orchestrator.parsing import (
    find_code_blocks,
    find_final_answer,
    open_code_block,
)
from rlm_orchestrator.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    FINAL_ANSWER_REQUEST,
    build_initial_messages,
    build_user_prompt,
)
from rlm_orchestrator.router import LMAnswer, LMRouter, UsageTracker
from rlm_orchestrator.session import SessionState
from rlm_orchestrator.sub_calls import ChildSpawner, SubCalls
from rlm_orchestrator.telemetry import metrics
from rlm_orchestrator.types import (
    AnswerSource,
    CodeBlock,
    RLMChatCompletion,
    RLMIteration,
)

DEFERRED_FINAL_NOTE = (
    "Note: your response both ran code and gave a final answer. The answer was not accepted "
    "because you had not seen the code's output yet. Check the output above, then answer with "
    "FINAL(...) or FINAL_VAR(...) in a response without code."
)
CUT_RESPONSE_NOTE = (
    "Note: your response was cut off by the output limit (max_tokens){what}. Write shorter "
    "responses: split long code across turns, and print only what you need to see."
)


@dataclass(frozen=True)
class LoopSettings:
    """One completion's settings, validated where they were given (config/limits.py)."""

    depth: int = 0
    max_depth: int = DEFAULT_MAX_DEPTH
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    timeout_seconds: float | None = None
    iteration_timeout_seconds: float | None = None
    # The limits of its sandboxes (each block's timeout and output cap come from here).
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    # What the root LM sees of one block's output.
    max_block_chars: int = 20_000
    max_concurrent_sub_calls: int = 16
    # Accept a FINAL given in the same response as code (the original's behaviour).
    final_with_code: bool = False
    # The longest FINAL_VAR answer, in characters: read from the sandbox in chunks, whole;
    # a longer one is refused (the model is told, and can shorten it), never cut.
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
    # How the model gives its answer: FINAL/FINAL_VAR, or upstream's `answer` dict.
    answer_convention: AnswerConvention = FINAL
    # The languages of the fenced blocks that run (```repl; config/fences.py).
    code_fences: tuple[str, ...] = DEFAULT_CODE_FENCES

    @property
    def final_in_text(self) -> bool:
        """Whether FINAL(...) / FINAL_VAR(...) in a response are answers."""
        return self.answer_convention == FINAL


@dataclass
class _Outcome:
    answer: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


class CompletionLoop:
    def __init__(
        self,
        settings: LoopSettings,
        router: LMRouter,
        tracker: UsageTracker,
        session: SessionState,
        *,
        root_model: str,
        emit: ev.EventHandler = ev.ignore_event,
        logger: RLMLogger | None = None,
        spawn_child: ChildSpawner | None = None,
        journal: CompletionJournal | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self.tracker = tracker
        self.session = session
        self.root_model = root_model
        if journal is not None:
            # Written as it runs; a resumed run catches up silently (its client had those).
            emit = _unless_replaying(emit, journal)
        self.emit = emit
        self.logger = logger
        # The root model: through the journal, when there is one (recorder.py).
        self.lm: LMRouter = router if journal is None else JournaledLM(router, journal)  # type: ignore[assignment]
        self.conversation = Conversation([])
        self.budget = ContextBudget(self.lm, root_model, tracker, emit, settings.depth)
        self.partial_answer: str | None = None
        self.last_response: str | None = None
        self.iterations = 0
        self.answer_source = ""  # how the answer was reached (an AnswerSource)
        self._deadline: float | None = None
        self.sub_calls = SubCalls(
            settings.depth,
            router,
            tracker,
            emit,
            settings.max_concurrent_sub_calls,
            self.remaining_seconds,
        )
        self.sub_calls.spawn_child = spawn_child
        self.blocks = BlockRunner(settings, session, self.sub_calls, emit, logger, journal)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation so far, as the root model sees it (compacted, when it was)."""
        return self.conversation.messages()

    @property
    def spawn_child(self) -> ChildSpawner | None:
        """How an `rlm_query` starts a child RLM (None: it is a plain LM call)."""
        return self.sub_calls.spawn_child

    @spawn_child.setter
    def spawn_child(self, spawn: ChildSpawner | None) -> None:
        self.sub_calls.spawn_child = spawn

    def remaining_seconds(self) -> float | None:
        """Time left before this completion's timeout (None: no timeout)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def run(
        self, context: Any, root_prompt: str | None, *, started_at: float | None = None
    ) -> RLMChatCompletion:
        """One completion. `started_at` (event-loop clock): when its time began, if not now."""
        clock = asyncio.get_running_loop()
        started = time.perf_counter()
        begun = clock.time() if started_at is None else started_at
        if self.settings.timeout_seconds is not None:
            self._deadline = begun + self.settings.timeout_seconds
        try:
            async with asyncio.timeout_at(self._deadline):
                answer = await self._run(context, root_prompt)
        except TimeoutError as exc:
            elapsed = clock.time() - begun
            raise CompletionTimeoutError(
                f"completion exceeded its timeout of {self.settings.timeout_seconds:g}s "
                f"after {self.iterations} iteration(s)",
                timeout_seconds=self.settings.timeout_seconds or 0.0,
                elapsed_seconds=elapsed,
                partial_answer=self.partial_answer,
                usage_summary=self.tracker.summary(),
                iterations=self.iterations,
            ) from exc
        except RLMError as exc:
            self._account(exc)
            raise
        elapsed, usage = time.perf_counter() - started, self.tracker.summary()
        return RLMChatCompletion(
            self.root_model, context, answer, usage, elapsed, self.iterations, self.answer_source
        )

    def _account(self, exc: RLMError) -> None:
        """What the caller paid for, on the error that ends the completion."""
        if exc.usage_summary is None:
            exc.usage_summary = self.tracker.summary()
        exc.iterations = exc.iterations or self.iterations
        if exc.partial_answer is None:
            exc.partial_answer = self.partial_answer
        if exc.last_response is None:
            exc.last_response = self.last_response

    async def _run(self, context: Any, root_prompt: str | None) -> str:
        self.conversation = Conversation(
            build_initial_messages(self.settings.system_prompt, context)
        )
        for iteration in range(self.settings.max_iterations):
            self.iterations = iteration + 1
            tail = [
                build_user_prompt(
                    root_prompt, iteration, self.session.context_count, self.session.history_count
                ),
            ]
            started = time.perf_counter()
            metrics.turn(self.settings.depth)
            try:
                async with asyncio.timeout(self.settings.iteration_timeout_seconds):
                    with telemetry.tracer().start_as_current_span(
                        "rlm.turn",
                        attributes={"rlm.depth": self.settings.depth, "rlm.iteration": iteration},
                    ):
                        record, outcome = await self._turn(tail, iteration)
            except TimeoutError as exc:
                raise CompletionTimeoutError(
                    f"iteration {iteration + 1} exceeded its timeout of "
                    f"{self.settings.iteration_timeout_seconds:g}s",
                    timeout_seconds=self.settings.iteration_timeout_seconds or 0.0,
                    elapsed_seconds=time.perf_counter() - started,
                    partial_answer=self.partial_answer,
                    usage_summary=self.tracker.summary(),
                    iterations=self.iterations,
                ) from exc
            record.iteration_time = time.perf_counter() - started
            record.final_answer = outcome.answer
            if self.logger:
                self.logger.log(record)
            if outcome.answer is not None:
                self.answer_source = outcome.source
                self.emit(
                    ev.FinalAnswer(
                        self.settings.depth, outcome.answer, outcome.source, self.iterations
                    )
                )
                return outcome.answer
            turn = Turn(iteration + 1, record.response, notes=outcome.notes)
            turn.blocks = [(b.code, self.blocks.shown(b.result)) for b in record.code_blocks]
            self.conversation.turns.append(turn)
            for note in outcome.notes:
                self.emit(ev.Notice(self.settings.depth, note))
            self._check_budget()
        return await self._out_of_turns()

    def _check_budget(self) -> None:
        reason = self.tracker.over_budget()
        if reason is not None:
            raise CostLimitExceededError(
                f"completion stopped: {reason}",
                current_cost=self.tracker.total_cost,
                cost_limit=self.tracker.max_cost or 0.0,
                partial_answer=self.partial_answer,
                usage_summary=self.tracker.summary(),
                iterations=self.iterations,
            )

    async def _fitted_call(
        self, tail: list[dict[str, Any]], turn: int
    ) -> tuple[list[dict[str, Any]], LMAnswer]:
        """The root call, the conversation compacted to fit the model's window first; once
        more when the server refuses it as too long (its window is now known)."""
        for attempt in (1, 2):
            await self.budget.fit(self.conversation, tail, turn)
            prompt = [*self.conversation.messages(), *tail]
            try:
                answer = await self.lm.complete(prompt, model=self.root_model, tracker=self.tracker)
            except ContextOverflowError as exc:
                if attempt == 2 or exc.window is None:
                    raise ContextWindowExceededError(
                        f"the conversation does not fit the root model's context window: {exc}",
                        context_window=exc.window,
                    ) from exc
                continue
            self.last_response = answer.text
            return prompt, answer
        raise AssertionError("unreachable")

    async def _root_call(
        self, tail: list[dict[str, Any]], iteration: int
    ) -> tuple[list[dict[str, Any]], LMAnswer]:
        turn = iteration + 1  # events count turns from 1, as the console shows them
        self.emit(ev.TurnStarted(self.settings.depth, turn, self.remaining_seconds()))
        prompt, answer = await self._fitted_call(tail, turn)
        depth = self.settings.depth
        self.emit(ev.RootResponse(depth, turn, answer.text, answer.duration, answer.finish_reason))
        self.emit(ev.UsageUpdated(self.settings.depth, self.tracker.summary()))
        self.partial_answer = answer.text
        self._check_budget()
        return prompt, answer

    async def _turn(
        self, tail: list[dict[str, Any]], iteration: int
    ) -> tuple[RLMIteration, _Outcome]:
        prompt, answer = await self._root_call(tail, iteration)
        response = answer.text
        record = RLMIteration(prompt=prompt, response=response)
        outcome = _Outcome()
        blocks = find_code_blocks(response, self.settings.code_fences)
        if answer.truncated:
            # A block the limit cut open is not run half-written; the model is told.
            unclosed = open_code_block(response, self.settings.code_fences)
            what = ": its last code block was not closed, and was not run" if unclosed else ""
            outcome.notes.append(CUT_RESPONSE_NOTE.format(what=what))
        for index, code in enumerate(blocks):
            result, answer_note = await self.blocks.run(iteration, index, code)
            metrics.code_block(result.status, self.settings.depth)
            record.code_blocks.append(CodeBlock(code, result))
            if result.worker_restarted and result.status != "sandbox_lost":
                # (A lost sandbox's block says what was rebuilt and what was not: blocks.py.)
                outcome.notes.append(
                    f"Note: the sandbox was restarted during block {index + 1}: "
                    "all variables were lost (the contexts were loaded again)."
                )
            if answer_note is not None:
                outcome.notes.append(answer_note)
            if result.final_answer is not None:
                # FINAL_VAR called inside the code (under answer_dict: `answer` made ready)
                # ends the run; later blocks do not run.
                outcome.answer, outcome.source = result.final_answer, self._in_code
                return record, outcome
        fences = self.settings.code_fences
        final = find_final_answer(response, fences) if self.settings.final_in_text else None
        if final is None:
            return record, outcome
        if blocks and not self.settings.final_with_code:
            if final.kind == "final":
                self.partial_answer = final.value
            outcome.notes.append(DEFERRED_FINAL_NOTE)
        elif final.kind == "final":
            outcome.answer, outcome.source = final.value, AnswerSource.FINAL
        else:
            read = await self._read_answer(final.value)
            if read.text is not None:
                outcome.answer, outcome.source = read.text, AnswerSource.FINAL_VAR
            else:
                outcome.notes.append(read.note)
        return record, outcome

    @property
    def _in_code(self) -> AnswerSource:
        """The source of an answer the code gave, under this answer convention."""
        final = self.settings.final_in_text
        return AnswerSource.FINAL_VAR_IN_CODE if final else AnswerSource.ANSWER_DICT

    async def _read_answer(self, name: str | None) -> AnswerRead:
        return await read_answer(self.session.sandbox.client, name, self.settings.max_answer_chars)

    async def _out_of_turns(self) -> str:
        """No final answer in max_iterations turns: one more call asks for one."""
        tail = [{"role": "assistant", "content": FINAL_ANSWER_REQUEST}]
        prompt, answer = await self._fitted_call(tail, self.iterations + 1)
        text = answer.text
        fences = self.settings.code_fences
        final = find_final_answer(text, fences) if self.settings.final_in_text else None
        if final is not None and final.kind == "final":
            text = final.value
        elif final is not None:
            read = await self._read_answer(final.value)
            if read.too_large:
                # No turn is left to shorten it, and no cut is ever silent: fail clearly.
                raise AnswerTooLargeError(
                    f"completion stopped: out of turns, and {read.note}",
                    partial_answer=None,
                    usage_summary=self.tracker.summary(),
                    iterations=self.iterations,
                )
            text = read.text if read.text is not None else text
        if self.logger:
            self.logger.log(RLMIteration(prompt=prompt, response=answer.text, final_answer=text))
        self.answer_source = AnswerSource.OUT_OF_TURNS
        self.emit(ev.FinalAnswer(self.settings.depth, text, self.answer_source, self.iterations))
        return text


def _unless_replaying(emit: ev.EventHandler, journal: CompletionJournal) -> ev.EventHandler:
    def handler(event: ev.Event) -> None:
        if not journal.replaying:
            emit(event)

    return handler
