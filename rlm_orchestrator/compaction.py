"""Keeping the root model's conversation inside its context window.

Every turn adds the model's response and up to `max_block_chars` of REPL output per block,
so a long session outgrows any window. Before each root call the conversation is measured
(context_window.py) against the window less the room kept for the answer, and when it does not
fit, older turns are compacted, cheapest first, until it does:

1. "outputs": the REPL outputs of old turns are elided (their code stays), oldest first;
2. "summary": old turns are replaced by a summary the root model writes of them (a paid call,
   counted in usage), when they take more than the summary may (an eighth of the window, at
   most 512 tokens); "dropped" instead when that call fails;
3. "dropped": old turns still there (too small to summarise with profit) are removed, a note
   in their place;
4. "cut": only when the latest turns alone are too large: their outputs are cut in the middle.

The system prompt, the context's description, the question and the latest `KEEP_TURNS` turns
are never compacted before stage 3. When even that does not fit, ContextWindowExceededError:
nothing that cannot fit is ever sent. Each stage is an event and a span.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator import events as ev
from rlm_orchestrator import telemetry
from rlm_orchestrator.context_window import MIN_OUTPUT_TOKENS
from rlm_orchestrator.exceptions import ContextWindowExceededError, LMError
from rlm_orchestrator.parsing import format_code_result_message
from rlm_orchestrator.router import LMRouter, UsageTracker
from sandbox_agent.limits import cut_middle

Message = dict[str, Any]
# Latest turns kept whole by stages 1 and 2: the model is working from them.
KEEP_TURNS = 2
# Room kept for the answer: the model's max_tokens, at most a quarter of the window (but no
# less than this, so a small window still leaves room for a code block).
MIN_RESERVED_TOKENS = 256
SUMMARY_MAX_TOKENS = 512
ELIDED = "[output elided to fit the model's context window: {chars} characters]"
SUMMARY_PROMPT = (
    "You compress the history of a Python REPL session in which an assistant works on a "
    "question. Summarise the turns below in at most 300 words: what was tried, what was "
    "found (facts, numbers, partial answers), and the names of the REPL variables that hold "
    "results. Do not invent anything; do not answer the question yourself."
)


@dataclass
class Turn:
    """One turn as the model sees it again: its response, each block's code and shown output,
    and the notes it was told."""

    number: int
    response: str
    blocks: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def messages(self) -> list[Message]:
        shown = [format_code_result_message(code, output) for code, output in self.blocks]
        notes = [{"role": "user", "content": note} for note in self.notes]
        return [{"role": "assistant", "content": self.response}, *shown, *notes]

    def transcript(self) -> str:
        parts = [f"## Turn {self.number}\nAssistant:\n{self.response}"]
        parts += [f"Code:\n{code}\nOutput:\n{output}" for code, output in self.blocks]
        return "\n\n".join(parts + self.notes)


@dataclass
class _Stage:
    name: str
    changed: int = 0


@dataclass
class Conversation:
    """The root model's conversation: a fixed head (system prompt, context description), a
    summary of compacted turns, and the turns."""

    head: list[Message]
    turns: list[Turn] = field(default_factory=list)
    summary: str | None = None

    def messages(self) -> list[Message]:
        summary = [] if self.summary is None else [{"role": "user", "content": self.summary}]
        return [*self.head, *summary, *(m for turn in self.turns for m in turn.messages())]


class ContextBudget:
    """Fits one loop's conversation to its root model's window before each root call."""

    def __init__(
        self,
        router: LMRouter,
        model: str,
        tracker: UsageTracker,
        emit: ev.EventHandler,
        depth: int,
    ) -> None:
        self.router = router
        self.model = model
        self.tracker = tracker
        self.emit = emit
        self.depth = depth

    def _estimate(self, conversation: Conversation, tail: list[Message]) -> int:
        return self.router.windows.estimate(self.model, [*conversation.messages(), *tail])

    async def fit(self, conversation: Conversation, tail: list[Message], turn: int) -> None:
        """Compact `conversation` in place until it and `tail` (this turn's prompt) fit the
        window with room for the answer; ContextWindowExceededError when they cannot."""
        config = self.router.resolve(self.model, 0)
        window = self.router.windows.window(config)
        if window is None:
            return  # nothing says how large it is: a refusal will (router.complete learns it)
        reserved = min(config.max_tokens or window // 4, max(window // 4, MIN_RESERVED_TOKENS))
        budget = window - reserved

        def fits() -> bool:
            return self._estimate(conversation, tail) <= budget

        if fits():
            return
        old = conversation.turns[:-KEEP_TURNS] if len(conversation.turns) > KEEP_TURNS else []
        with self._stage("outputs", conversation, tail, turn, window) as stage:
            stage.changed = _elide(old, fits)
        summary_tokens = min(SUMMARY_MAX_TOKENS, max(64, window // 8))
        if not fits() and self._worth_summarising(old, summary_tokens):
            with self._stage("summary", conversation, tail, turn, window) as stage:
                stage.name, stage.changed = await self._summarise(
                    conversation, old, window, summary_tokens
                )
        old = conversation.turns[:-KEEP_TURNS] if len(conversation.turns) > KEEP_TURNS else []
        if not fits() and old:
            # Too small to summarise with profit, and still too large: they go, said so.
            with self._stage("dropped", conversation, tail, turn, window) as stage:
                stage.changed = _drop(conversation, old)
        if not fits():
            with self._stage("cut", conversation, tail, turn, window) as stage:
                stage.changed = _cut_latest(conversation, tail, budget, self._estimate)
        needed = self._estimate(conversation, tail)
        if needed > window - MIN_OUTPUT_TOKENS:
            raise ContextWindowExceededError(
                f"the conversation does not fit the root model's context window of {window} "
                f"tokens even compacted (about {needed} tokens: the system prompt and the "
                "question alone may be too large); nothing was sent",
                context_window=window,
            )

    @contextlib.contextmanager
    def _stage(
        self, name: str, conversation: Conversation, tail: list[Message], turn: int, window: int
    ) -> Iterator[_Stage]:
        """A span around one stage, and its event when it changed anything."""
        stage = _Stage(name)
        before = self._estimate(conversation, tail)
        with telemetry.tracer().start_as_current_span(
            "rlm.compact", attributes={"rlm.depth": self.depth}
        ) as span:
            yield stage
            after = self._estimate(conversation, tail)
            span.set_attributes(
                {
                    "rlm.compact.stage": stage.name,
                    "rlm.compact.messages": stage.changed,
                    "rlm.compact.tokens_before": before,
                    "rlm.compact.tokens_after": after,
                    "rlm.context_window": window,
                }
            )
        if stage.changed:
            self.emit(
                ev.ContextCompacted(
                    self.depth, turn, stage.name, before, after, window, stage.changed
                )
            )

    def _worth_summarising(self, old: list[Turn], summary_tokens: int) -> bool:
        """Whether replacing these turns by a summary saves room: they must take more than a
        summary may (else the summary could grow the conversation, and summarising the
        summary each turn would cost a call for nothing: such turns are dropped instead)."""
        if not old:
            return False
        taken = self.router.windows.estimate(self.model, [m for t in old for m in t.messages()])
        return taken > summary_tokens

    async def _summarise(
        self, conversation: Conversation, old: list[Turn], window: int, summary_tokens: int
    ) -> tuple[str, int]:
        """Replace the old turns by a summary the model writes: ("summary", messages), or
        ("dropped", messages) when the call fails."""
        first, last = old[0].number, old[-1].number
        earlier = f"{conversation.summary}\n\n" if conversation.summary else ""
        transcript = earlier + "\n\n".join(turn.transcript() for turn in old)
        room = self.router.windows.chars_for(self.model, window - summary_tokens - 200)
        prompt = [
            {"role": "system", "content": SUMMARY_PROMPT},
            {"role": "user", "content": cut_middle(transcript, max(room, 200))},
        ]
        removed = sum(len(turn.messages()) for turn in old)
        del conversation.turns[: len(old)]
        try:
            answer = await self.router.complete(
                prompt, model=self.model, tracker=self.tracker, max_tokens=summary_tokens
            )
        except LMError:
            conversation.summary = (
                f"[Turns 1-{last} were dropped to fit the model's context window.]"
            )
            return "dropped", removed
        conversation.summary = (
            f"[Turns {1 if earlier else first}-{last} were summarised to fit the model's context "
            f"window. Summary:]\n{answer.text}"
        )
        self.emit(ev.UsageUpdated(self.depth, self.tracker.summary()))
        return "summary", removed


def _drop(conversation: Conversation, old: list[Turn]) -> int:
    """Old turns removed, a note (and the earlier summary, if any) in their place."""
    removed = sum(len(turn.messages()) for turn in old)
    del conversation.turns[: len(old)]
    dropped = f"[Turns up to {old[-1].number} were dropped to fit the model's context window.]"
    # An earlier summary stays; an earlier note of the same kind is replaced, not stacked.
    kept = [line for line in (conversation.summary or "").split("\n") if line]
    kept = [line for line in kept if not line.startswith("[Turns up to ")]
    conversation.summary = "\n".join([*kept, dropped])
    return removed


def _elide(turns: list[Turn], fits: Callable[[], bool]) -> int:
    """Stage 1, oldest first, until it fits: how many outputs were elided."""
    count = 0
    for turn in turns:
        for index, (code, output) in enumerate(turn.blocks):
            if fits():
                return count
            if not output.startswith("[output elided"):
                turn.blocks[index] = (code, ELIDED.format(chars=len(output)))
                count += 1
    return count


def _cut_latest(
    conversation: Conversation,
    tail: list[Message],
    budget: int,
    estimate: Callable[[Conversation, list[Message]], int],
) -> int:
    """Stage 3: halve the largest output (or response) of the kept turns until it fits."""
    count = 0
    for _ in range(64):  # bounded: each pass halves a piece of at least 400 characters
        if estimate(conversation, tail) <= budget:
            return count
        pieces = [
            (len(output), turn, index)
            for turn in conversation.turns
            for index, (_, output) in enumerate(turn.blocks)
        ] + [(len(turn.response), turn, -1) for turn in conversation.turns]
        if not pieces:
            return count
        size, turn, index = max(pieces, key=lambda piece: piece[0])
        if size < 400:
            return count
        keep = max(200, size // 2)
        if index < 0:
            turn.response = cut_middle(turn.response, keep)
        else:
            code, output = turn.blocks[index]
            turn.blocks[index] = (code, cut_middle(output, keep))
        count += 1
    return count
