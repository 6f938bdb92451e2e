"""`RLM`: the original library's entry point, on sandboxes reached over gRPC.

Same constructor and `completion()` as the original. Each completion gets a fresh sandbox
(released at the end, whatever happens: error, timeout, Ctrl-C), unless `persistent=True`,
where one sandbox lives until `close()` and every completion adds `context_N` to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from rlm_orchestrator import budget, lm_keys, telemetry
from rlm_orchestrator import events as ev
from rlm_orchestrator.config.answer import ANSWER_CONVENTIONS, FINAL, AnswerConvention
from rlm_orchestrator.config.errors import Loc, dotted, refusing
from rlm_orchestrator.config.fences import DEFAULT_CODE_FENCES
from rlm_orchestrator.config.fences import code_fences as code_fences_of
from rlm_orchestrator.config.limits import (
    DEFAULT_MAX_ANSWER_CHARS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ITERATIONS,
    CompletionLimits,
)
from rlm_orchestrator.config.lm import LMClientConfig
from rlm_orchestrator.config.sandbox import rlm_environment
from rlm_orchestrator.exceptions import ConfigurationError
from rlm_orchestrator.logger import RLMLogger, redact
from rlm_orchestrator.loop import LoopSettings
from rlm_orchestrator.prompts import system_prompt_for
from rlm_orchestrator.router import LMRouter, UsageTracker
from rlm_orchestrator.runner import CompletionRunner, LazyProvider
from rlm_orchestrator.sandbox import SandboxProvider, create_provider
from rlm_orchestrator.session import SessionState
from rlm_orchestrator.telemetry import metrics
from rlm_orchestrator.types import RLMChatCompletion, RLMMetadata


def _argument(loc: Loc) -> str:
    return f"RLM argument {dotted(loc)}"


class RLM:
    """A Recursive Language Model: the root LM reaches its context only through a REPL."""

    def __init__(
        self,
        backend: str = "openai",
        backend_kwargs: dict[str, Any] | None = None,
        environment: str = "local",
        environment_kwargs: dict[str, Any] | None = None,
        depth: int = 0,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        custom_system_prompt: str | None = None,
        other_backends: list[str] | None = None,
        other_backend_kwargs: list[dict[str, Any]] | None = None,
        logger: RLMLogger | None = None,
        verbose: bool = False,
        persistent: bool = False,
        max_cost: float | None = None,
        timeout_seconds: float | None = None,
        iteration_timeout_seconds: float | None = None,
        *,
        on_event: ev.EventHandler | None = None,
        final_with_code: bool = False,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        answer_convention: AnswerConvention = FINAL,
        code_fences: Sequence[str] = DEFAULT_CODE_FENCES,
    ) -> None:
        self.backend = backend
        self.backend_kwargs = dict(backend_kwargs or {})
        self.environment = environment
        self.environment_kwargs = dict(environment_kwargs or {})
        with refusing(_argument):
            # Checked now (unknown keys, types, ranges), not when the first sandbox starts.
            self.sandbox, self.setup_code = rlm_environment(environment, self.environment_kwargs)
            self.limits = CompletionLimits(
                max_iterations=max_iterations,
                max_depth=max_depth,
                timeout_seconds=timeout_seconds,
                iteration_timeout_seconds=iteration_timeout_seconds,
                max_cost=max_cost,
                max_answer_chars=max_answer_chars,
            )
        if other_backends and len(other_backends) != len(other_backend_kwargs or []):
            raise ConfigurationError(
                "other_backends and other_backend_kwargs must have the same length"
            )
        # As in the original, a model is needed only when a completion runs: `RLM()` builds.
        self._root_config: LMClientConfig | None = None
        if self.backend_kwargs.get("model_name"):
            self._root_config = LMClientConfig.from_backend(backend, self.backend_kwargs)
        else:
            # The rest is checked now all the same: an unknown backend, a bad option.
            LMClientConfig.from_backend(backend, {**self.backend_kwargs, "model_name": "unset"})
        self.other_configs = [
            LMClientConfig.from_backend(b, k)
            for b, k in zip(other_backends or [], other_backend_kwargs or [], strict=True)
        ]
        self.other_backends = other_backends
        # A model with no price counts as $0: max_cost cannot stop its spending (say so now).
        models = [c for c in (self._root_config, *self.other_configs) if c is not None]
        budget.warn_if_unenforceable(self.limits.max_cost, models)
        if not isinstance(depth, int) or depth < 0:
            raise ConfigurationError(f"RLM argument depth: must be an int >= 0 (got {depth!r})")
        self.depth = depth
        self.max_depth = self.limits.max_depth
        self.max_iterations = self.limits.max_iterations
        if answer_convention not in ANSWER_CONVENTIONS:
            raise ConfigurationError(
                f"RLM argument answer_convention: must be one of {', '.join(ANSWER_CONVENTIONS)} "
                f"(got {answer_convention!r})"
            )
        # FINAL/FINAL_VAR in the text, or upstream's `answer` dict in the REPL (answer_dict.py);
        # the default system prompt teaches the one in use (a custom one is the caller's).
        self.answer_convention: AnswerConvention = answer_convention
        self.system_prompt = custom_system_prompt or system_prompt_for(answer_convention)
        try:
            # ```repl, the original's contract; ("repl", "python") also runs ```python blocks.
            self.code_fences = code_fences_of(code_fences)
        except ValueError as exc:
            raise ConfigurationError(f"RLM argument code_fences: {exc}") from None
        self.logger = logger
        self.verbose = verbose
        self.persistent = persistent
        self.max_cost = self.limits.max_cost
        self.timeout_seconds = self.limits.timeout_seconds
        self.iteration_timeout_seconds = self.limits.iteration_timeout_seconds
        self.final_with_code = final_with_code
        # FINAL_VAR answers up to this many characters come back whole; longer ones are refused.
        self.max_answer_chars = self.limits.max_answer_chars
        self._on_event = on_event or ev.ignore_event
        if verbose:
            from rlm_orchestrator.console import EventPrinter

            printer = EventPrinter()
            user_handler = self._on_event

            def both(event: ev.Event) -> None:
                printer(event)
                user_handler(event)

            self._on_event = both
        self._provider: SandboxProvider | None = None
        self._session: SessionState | None = None
        self._runner: asyncio.Runner | None = None
        if logger is not None:
            logger.log_metadata(self.metadata())

    @property
    def root_config(self) -> LMClientConfig:
        """The root model's configuration; ConfigurationError when no model was given."""
        if self._root_config is None:
            raise ConfigurationError(
                f"no root model: a completion needs backend_kwargs={{'model_name': ...}} "
                f"(backend {self.backend!r})"
            )
        return self._root_config

    def metadata(self) -> RLMMetadata:
        return RLMMetadata(
            root_model=self._root_config.model_name if self._root_config else "unknown",
            max_depth=self.max_depth,
            max_iterations=self.max_iterations,
            backend=self.backend,
            backend_kwargs=redact(self.backend_kwargs),
            environment_type=self.environment,
            environment_kwargs=redact(self.environment_kwargs),
            other_backends=self.other_backends,
        )

    def _settings(self) -> LoopSettings:
        return LoopSettings(
            depth=self.depth,
            max_depth=self.max_depth,
            max_iterations=self.max_iterations,
            system_prompt=self.system_prompt,
            timeout_seconds=self.timeout_seconds,
            iteration_timeout_seconds=self.iteration_timeout_seconds,
            sandbox=self.sandbox.limits,
            final_with_code=self.final_with_code,
            max_answer_chars=self.max_answer_chars,
            answer_convention=self.answer_convention,
            code_fences=self.code_fences,
        )

    # -- synchronous API --------------------------------------------------------------------

    def completion(self, prompt: Any, root_prompt: str | None = None) -> RLMChatCompletion:
        """Answer `root_prompt` (or the task in `prompt`) about the context `prompt`."""
        if not self.persistent:
            return asyncio.run(self.acompletion(prompt, root_prompt))
        # A persistent sandbox's channel belongs to one event loop: keep that loop.
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(self.acompletion(prompt, root_prompt))

    def close(self) -> None:
        """End a persistent session: its sandbox is released. Idempotent."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                runner.run(self.aclose())
            finally:
                runner.close()

    def __enter__(self) -> RLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- asynchronous API -------------------------------------------------------------------

    async def acompletion(self, prompt: Any, root_prompt: str | None = None) -> RLMChatCompletion:
        telemetry.configure()  # from OTEL_* / RLM_TRACE_STORE, once per process; off otherwise
        for config in (self.root_config, *self.other_configs):
            # Refused before a sandbox starts, not after retries of a call never sent.
            if reason := lm_keys.missing_key(config):
                raise ConfigurationError(reason)
        router = LMRouter(self.root_config, self.other_configs)
        # litellm imports while the sandbox starts; the runner waits for it before the loop.
        router.start_prepare()
        # Created on first use: a plain LM call (depth >= max_depth) never makes one.
        provider = self._provider or LazyProvider(lambda: create_provider(self.sandbox.backend))
        runner = CompletionRunner(
            router,
            provider,
            self._settings(),
            emit=self._on_event,
            logger=self.logger,
            setup_code=self.setup_code,
        )
        tracker = UsageTracker(self.max_cost)
        root_model = self.root_config.model_name
        try:
            if self.persistent and self.depth < self.max_depth:
                session = await self._acquire_session(runner)
                return await runner.run(
                    prompt, root_prompt, tracker=tracker, root_model=root_model, session=session
                )
            return await runner.run(prompt, root_prompt, tracker=tracker, root_model=root_model)
        finally:
            if self._provider is None:
                await provider.aclose()
            await router.finish_callbacks()

    async def _acquire_session(self, runner: CompletionRunner) -> SessionState:
        if self._session is not None:
            return self._session
        self._provider = runner.provider
        self._session = await runner.new_session()
        return self._session

    async def _release_session(self) -> None:
        provider, session = self._provider, self._session
        self._provider, self._session = None, None
        if provider is not None:
            if session is not None:
                metrics.sandbox_released(session.sandbox.sandbox_id)
                await provider.release(session.sandbox)
            await provider.aclose()

    async def aclose(self) -> None:
        await self._release_session()

    async def __aenter__(self) -> RLM:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
