"""Running completions on sandboxes: the part `RLM` and the orchestrator service share.

A CompletionRunner owns nothing long-lived of its own: it borrows a router (LM calls) and a
provider (sandboxes). For each completion it takes a sandbox (or uses a session's), runs the
loop, and gives the sandbox back, whatever happens. Child RLMs (`rlm_query` when depth
allows) are completions of the same runner one level deeper, with the time left to their
parent at the call (their sandbox start included) and a usage tracker that reports to the
parent's, so budgets count the whole tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

from rlm_orchestrator import answer_dict, telemetry
from rlm_orchestrator import events as ev
from rlm_orchestrator.config.answer import ANSWER_DICT
from rlm_orchestrator.journal.recorder import CompletionJournal
from rlm_orchestrator.journal.replay import BlockRecord
from rlm_orchestrator.logger import RLMLogger
from rlm_orchestrator.loop import CompletionLoop, LoopSettings
from rlm_orchestrator.router import LMRouter, UsageTracker
from rlm_orchestrator.sandbox import Sandbox, SandboxProvider, SandboxSpec, SubCallOutcome
from rlm_orchestrator.session import SessionState
from rlm_orchestrator.telemetry import metrics
from rlm_orchestrator.types import AnswerSource, RLMChatCompletion


class LazyProvider:
    """A provider made on first use: a plain LM call never pays for a sandbox backend."""

    name = "lazy"  # then the backend's, once made

    def __init__(self, factory: Callable[[], SandboxProvider]) -> None:
        self._factory = factory
        self._provider: SandboxProvider | None = None

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        if self._provider is None:
            self._provider = self._factory()
            self.name = self._provider.name
        return await self._provider.acquire(spec)

    async def release(self, sandbox: Sandbox) -> None:
        if self._provider is not None:
            await self._provider.release(sandbox)

    async def aclose(self) -> None:
        if self._provider is not None:
            await self._provider.aclose()


async def _ignore_output(stream: str, text: str) -> None:
    return None


async def _no_sub_calls(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
    return [SubCallOutcome(error="sub-calls are not available in setup_code")] * len(prompts)


class CompletionRunner:
    def __init__(
        self,
        router: LMRouter,
        provider: SandboxProvider,
        settings: LoopSettings,
        *,
        emit: ev.EventHandler = ev.ignore_event,
        logger: RLMLogger | None = None,
        setup_code: str | None = None,
    ) -> None:
        self.setup_code = setup_code
        self.router = router
        self.provider = provider
        self.settings = settings
        self.emit = emit
        self.logger = logger

    def model_at(self, depth: int) -> str:
        """The model an RLM at `depth` uses as its root: depth 0 the root, deeper the sub."""
        return self.router.resolve(None, depth).model_name

    async def new_session(self) -> SessionState:
        spec = SandboxSpec.of(uuid.uuid4().hex, self.settings.sandbox)
        attributes = {"rlm.sandbox.provider": self.provider.name}
        started = time.perf_counter()
        with telemetry.tracer().start_as_current_span("rlm.sandbox.create", attributes=attributes):
            sandbox = await self.provider.acquire(spec)
        metrics.sandbox_acquired(
            self.provider.name, sandbox.sandbox_id, time.perf_counter() - started
        )
        if self.setup_code:
            try:
                await sandbox.client.execute(
                    self.setup_code, on_output=_ignore_output, on_sub_call=_no_sub_calls
                )
            except BaseException:
                await self.release(sandbox)
                raise
        return SessionState(sandbox, replace=self._replace)

    async def release(self, sandbox: Sandbox) -> None:
        """Give a sandbox back to the provider (and out of the metrics' live ones)."""
        metrics.sandbox_released(sandbox.sandbox_id)
        await self.provider.release(sandbox)

    async def _replace(self, lost: Sandbox) -> Sandbox:
        with contextlib.suppress(Exception):
            await self.release(lost)
        return (await self.new_session()).sandbox

    async def run(
        self,
        context: Any,
        root_prompt: str | None,
        *,
        tracker: UsageTracker,
        root_model: str,
        depth: int | None = None,
        session: SessionState | None = None,
        timeout_seconds: float | None = None,
        journal: CompletionJournal | None = None,
    ) -> RLMChatCompletion:
        """One completion. With `session`, its sandbox is used (and kept, with history); with
        `journal`, it is written there as it runs (and answered from it where it has answers)."""
        depth = self.settings.depth if depth is None else depth
        attributes: dict[str, str | int] = {"rlm.depth": depth, "rlm.root_model": root_model}
        try:
            with (
                telemetry.tracer().start_as_current_span(
                    "rlm.completion", attributes=attributes
                ) as span,
                metrics.completion(counted=depth == self.settings.depth),
            ):
                try:
                    result = await self._run(
                        context,
                        root_prompt,
                        tracker,
                        root_model,
                        depth,
                        session,
                        timeout_seconds,
                        journal,
                    )
                except BaseException as exc:
                    telemetry.mark_error(span, exc)
                    span.set_attribute("rlm.cost_usd", tracker.total_cost)
                    raise
                span.set_attribute("rlm.cost_usd", tracker.total_cost)
                # How it ended, as `trace show` prints it ("iterations=3 final=final_var").
                span.set_attribute("rlm.iterations", result.iterations)
                span.set_attribute("rlm.final_source", result.answer_source)
                if telemetry.record_content():  # the answer, as the viewer shows it
                    span.set_attribute("rlm.answer", telemetry.content(result.response))
                return result
        finally:
            # The completion's trace leaves now (its own span too: it has ended), not later.
            if depth == self.settings.depth:
                await telemetry.flush()

    async def _run(
        self,
        context: Any,
        root_prompt: str | None,
        tracker: UsageTracker,
        root_model: str,
        depth: int,
        session: SessionState | None,
        timeout_seconds: float | None,
        journal: CompletionJournal | None = None,
    ) -> RLMChatCompletion:
        if depth >= self.settings.max_depth:
            return await self._plain_lm(context, root_model, tracker, depth)
        # A child's time left runs from its parent's call: starting its sandbox uses it too.
        called_at = asyncio.get_running_loop().time()
        top_level = depth == self.settings.depth
        if timeout_seconds is None and top_level:
            timeout_seconds = self.settings.timeout_seconds
        settings = dataclasses.replace(self.settings, depth=depth, timeout_seconds=timeout_seconds)
        own_session = session is None
        active = session or await self.new_session()
        try:
            await active.add_context(context)
            if self.settings.answer_convention == ANSWER_DICT:
                # A fresh `answer` every completion (a persistent session keeps the last one).
                installed = await answer_dict.install(active.sandbox.client)
                active.record(
                    BlockRecord(answer_dict.INSTALL_CODE, internal=True).finish(installed),
                    installed.worker_restarted,
                )
            # The LM client's import (started before the sandbox) ends before the loop's
            # deadline starts: it delays the first turn, it does not shorten the completion.
            await self.router.prepare()
            # Children do not write into their parent's trajectory log.
            logger = self.logger if top_level else None
            loop = CompletionLoop(
                settings,
                self.router,
                tracker,
                active,
                root_model=root_model,
                emit=self.emit,
                logger=logger,
                journal=journal,
            )

            async def spawn_child(prompt: str, seconds_left: float | None) -> RLMChatCompletion:
                return await self.run(
                    prompt,
                    None,
                    tracker=UsageTracker(parent=tracker),
                    depth=depth + 1,
                    root_model=self.model_at(depth + 1),
                    timeout_seconds=seconds_left,
                )

            if depth + 1 < self.settings.max_depth:
                loop.spawn_child = spawn_child
            result = await loop.run(
                context, root_prompt, started_at=None if top_level else called_at
            )
            if not own_session:
                await active.add_history(loop.messages)
            return result
        finally:
            if own_session:
                with telemetry.tracer().start_as_current_span("rlm.sandbox.release"):
                    await self.release(active.sandbox)

    async def _plain_lm(
        self, prompt: Any, root_model: str, tracker: UsageTracker, depth: int
    ) -> RLMChatCompletion:
        """At depth >= max_depth an RLM is a plain LM call (same result type)."""
        await self.router.prepare()
        started = time.perf_counter()
        answer = await self.router.complete(prompt, model=root_model, tracker=tracker)
        self.emit(ev.FinalAnswer(depth, answer.text, AnswerSource.PLAIN_LM, 0))
        elapsed = time.perf_counter() - started
        return RLMChatCompletion(
            root_model, prompt, answer.text, tracker.summary(), elapsed, 0, AnswerSource.PLAIN_LM
        )
