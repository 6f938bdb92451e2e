"""A sandbox and what has been put into it, for one completion or a persistent session.

It keeps, in order, every step that built its namespace: the values loaded (contexts,
histories) and the blocks that ran, with the answers of their sub-calls. When its sandbox is
lost, it moves to a new one and replays those steps (journal/replay.py): the namespace comes
back as it was, without a model call, unless the code read something that changed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator import telemetry
from rlm_orchestrator.journal.replay import BlockRecord, Divergence, RecordedSubCalls, compare
from rlm_orchestrator.sandbox import Sandbox

log = logging.getLogger("rlm_orchestrator.session")


@dataclass(frozen=True)
class Load:
    """A value loaded into the REPL under `name` (and `alias`, when not empty)."""

    name: str
    value: Any
    alias: str


async def _ignore_output(stream: str, text: str) -> None:
    return None


@dataclass
class SessionState:
    """A sandbox and what has been loaded into it; lives across completions when persistent."""

    sandbox: Sandbox
    context_count: int = 0
    history_count: int = 0
    # Gives the lost sandbox back (best effort) and a new one: set by the runner.
    replace: Callable[[Sandbox], Awaitable[Sandbox]] | None = None
    # What built the namespace, in order, since it began (a restarted worker begins anew).
    steps: list[Load | BlockRecord] = field(default_factory=list)

    async def _load(self, name: str, value: Any, alias: str) -> None:
        await self.sandbox.client.load_value(name, value, alias)
        self.steps.append(Load(name, value, alias))

    async def add_context(self, context: Any) -> None:
        index = self.context_count
        await self._load(f"context_{index}", context, "context" if index == 0 else "")
        self.context_count += 1

    async def add_history(self, messages: list[dict[str, Any]]) -> None:
        index = self.history_count
        await self._load(f"history_{index}", messages, "history" if index == 0 else "")
        self.history_count += 1

    def record(self, block: BlockRecord, worker_restarted: bool) -> None:
        """A block ran. When its worker was restarted (a timeout, a crash), the namespace holds
        only the loaded values again: the blocks before it no longer count."""
        if worker_restarted:
            self.steps = [step for step in self.steps if isinstance(step, Load)]
        else:
            self.steps.append(block)

    async def recover(self, timeout_seconds: float, max_output_chars: int) -> Divergence | None:
        """Move to a new sandbox (the old one was lost) and rebuild the namespace there: the
        values loaded again, the blocks replayed with their recorded sub-call answers. The
        first divergence stops the replay (the namespace then holds what ran until there)."""
        assert self.replace is not None
        self.sandbox = await self.replace(self.sandbox)
        steps, self.steps = self.steps, []
        blocks = sum(isinstance(step, BlockRecord) for step in steps)
        with telemetry.tracer().start_as_current_span(
            "rlm.replay", attributes={"rlm.replay.blocks": blocks}
        ) as span:
            divergence = await self._replay(steps, timeout_seconds, max_output_chars)
            span.set_attribute("rlm.replay.diverged", divergence is not None)
        if divergence is not None:
            log.warning("replay of a lost sandbox diverged at %s", divergence)
        return divergence

    async def _replay(
        self, steps: list[Load | BlockRecord], timeout_seconds: float, max_output_chars: int
    ) -> Divergence | None:
        index = 0
        for step in steps:
            if isinstance(step, Load):
                await self._load(step.name, step.value, step.alias)
                continue
            served = RecordedSubCalls(step.sub_calls)
            report = await self.sandbox.client.execute(
                step.code,
                on_output=_ignore_output,
                on_sub_call=served,
                timeout_seconds=timeout_seconds,
                max_output_chars=max_output_chars,
            )
            again = BlockRecord(step.code, step.sub_calls, internal=step.internal).finish(report)
            self.record(again, report.worker_restarted)
            if served.divergence is not None:
                return Divergence(index, "sub_call", served.divergence)
            if (divergence := compare(index, step, report)) is not None:
                return divergence
            index += 1
        return None
