"""LM routing: which model answers a call, with retries, caps, spans and accounting.

Two transports behind the same router (a model's `transport`): a lean HTTP POST for plain
OpenAI-compatible endpoints (lm_http.py, prices from lm_prices.py), and litellm for every
other provider (lm_litellm.py, imported in the background and only when a model needs it).
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanKind

from rlm_orchestrator import lm_http, lm_litellm, lm_prices, telemetry
from rlm_orchestrator.config.lm import LMClientConfig as LMClientConfig  # re-exported
from rlm_orchestrator.context_window import ContextOverflowError, ModelWindows, overflow_in
from rlm_orchestrator.exceptions import LMError
from rlm_orchestrator.telemetry import metrics
from rlm_orchestrator.types import ModelUsageSummary, UsageSummary

MAX_ERROR_CHARS = 600
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_WAIT = 10.0
Messages = list[dict[str, Any]]


@dataclass
class LMAnswer:
    """One successful LM call."""

    text: str
    model: str
    usage: ModelUsageSummary
    duration: float
    # 1 + the retries it took.
    attempts: int = 1
    # The model the provider says answered.
    response_model: str = ""
    # Why generation stopped: "stop", "length" (cut at max_tokens), "tool_calls", ...
    finish_reason: str = "stop"

    @property
    def truncated(self) -> bool:
        """Cut by the output limit (max_tokens, or the window) rather than finished."""
        return self.finish_reason == "length"


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


# Causes (by class name, anywhere in an exception's chain) that mean no HTTP status applies:
# litellm reports both as status 500.
_UNREACHED = {"APIConnectionError", "ClientConnectorError", "ConnectError", "ConnectionError"}


def _no_status(exc: BaseException) -> str | None:
    """Why `exc` has no real HTTP status: "unreached" (the server was never reached), or
    "garbled" (it answered, with something that is no chat completion); None: it has one."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if type(seen).__name__ in _UNREACHED or isinstance(seen, ConnectionError):
            return "unreached"
        if isinstance(seen, json.JSONDecodeError) or "response with no 'choices'" in str(seen):
            return "garbled"
        seen = seen.__cause__ or seen.__context__
    return None


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | ConnectionError):
        return True
    name = type(exc).__name__
    if name in {
        "APIConnectionError",
        "Timeout",
        "RateLimitError",
        "ServiceUnavailableError",
        "InternalServerError",
    }:
        return True
    return _status_of(exc) in RETRYABLE_STATUS


def as_messages(prompt: Any) -> Messages:
    """A prompt as chat messages: a str is one user message; messages pass through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    import json

    return [{"role": "user", "content": json.dumps(prompt, default=str)}]


class UsageTracker:
    """Usage of every call made for one completion (and its children), and the budget."""

    def __init__(self, max_cost: float | None = None, parent: UsageTracker | None = None) -> None:
        self.max_cost = max_cost
        self.parent = parent
        self._usage = UsageSummary()

    def record(self, model: str, usage: ModelUsageSummary) -> None:
        self._usage.model_usage_summaries.setdefault(model, ModelUsageSummary()).add(usage)
        if self.parent is not None:
            self.parent.record(model, usage)

    def summary(self) -> UsageSummary:
        return self._usage.copy()

    @property
    def total_cost(self) -> float:
        return self._usage.total_cost

    def over_budget(self) -> str | None:
        """Why no more spending is allowed, if it is not; a parent's budget counts too."""
        if self.max_cost is not None and self.total_cost > self.max_cost:
            return f"cost ${self.total_cost:.6f} exceeded the limit ${self.max_cost:.6f}"
        return self.parent.over_budget() if self.parent is not None else None


class LMRouter:
    """Routes calls: an explicit registered model name, else depth 0 -> root, deeper -> sub."""

    def __init__(self, root: LMClientConfig, others: Sequence[LMClientConfig] = ()) -> None:
        self.root = root
        self.sub = others[0] if others else root
        self.models: dict[str, LMClientConfig] = {root.model_name: root}
        for other in others:
            self.models.setdefault(other.model_name, other)
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        # Each model's lean endpoint, or None: through litellm.
        self.endpoints = {name: lm_http.endpoint_for(c) for name, c in self.models.items()}
        self._http = lm_http.Sessions()
        # Each model's window and token estimate, shared by every view of this router.
        self.windows = ModelWindows()

    def with_roles(self, root: str | None = None, sub: str | None = None) -> LMRouter:
        """A view that sends depth 0 / depth >= 1 elsewhere; models and caps are shared."""
        view = copy.copy(self)
        view.root = self.resolve(root, 0) if root else self.root
        view.sub = self.resolve(sub, 1) if sub else self.sub
        return view

    @property
    def needs_litellm(self) -> bool:
        return any(endpoint is None for endpoint in self.endpoints.values())

    def start_prepare(self) -> None:
        """Start the imports the models need in the background; `prepare()` waits for them."""
        if self.needs_litellm:
            lm_litellm.start_import()
        lean = [self.models[n] for n, e in self.endpoints.items() if e is not None]
        if lean:
            lm_http.start_import(any(c.configured_cost(0, 0) is None for c in lean))

    async def prepare(self) -> None:
        """Finish those imports off the event loop (once), before any deadline runs: litellm
        only when a model goes through it."""
        self.start_prepare()
        if self.needs_litellm:
            await lm_litellm.loaded()
        if any(endpoint is not None for endpoint in self.endpoints.values()):
            await lm_http.imported()

    async def finish_callbacks(self, timeout: float = 2.0) -> None:
        """Before this event loop ends: this router's lean session closed and litellm's
        logging worker stopped (both belong to the loop)."""
        await self._http.aclose()
        await lm_litellm.finish_callbacks(timeout)

    def resolve(self, model: str | None, depth: int) -> LMClientConfig:
        if model:
            if model not in self.models:
                raise LMError(
                    f"unknown model {model!r}; registered models: {sorted(self.models)}",
                    model=model,
                )
            return self.models[model]
        return self.root if depth == 0 else self.sub

    def _semaphore(self, config: LMClientConfig) -> asyncio.Semaphore:
        if config.model_name not in self._semaphores:
            self._semaphores[config.model_name] = asyncio.Semaphore(config.max_concurrency)
        return self._semaphores[config.model_name]

    async def complete(
        self,
        prompt: Any,
        *,
        model: str | None = None,
        depth: int = 0,
        tracker: UsageTracker | None = None,
        max_tokens: int | None = None,
    ) -> LMAnswer:
        """One call, retried on 429/5xx/timeouts; raises LMError when it fails for good.

        `max_tokens` lowers the model's output limit for this call. A prompt that cannot fit
        the model's window (when it is known) is refused with ContextOverflowError, never sent;
        one that fits gets an output limit that keeps the request inside the window."""
        config = self.resolve(model, depth)
        endpoint = self.endpoints.get(config.model_name)
        litellm = None if endpoint is not None else await lm_litellm.loaded()
        messages = as_messages(prompt)
        limit = self.windows.output_limit(config, messages, max_tokens)
        if not telemetry.recording():  # no tracer provider: no span to make, not even a no-op
            return await self._call(config, endpoint, messages, litellm, tracker, limit)
        provider, _, _ = config.litellm_model.rpartition("/")
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": provider.split("/")[0] if provider else config.backend,
            "gen_ai.request.model": config.model_name,
            "rlm.depth": depth,
        }
        with telemetry.tracer().start_as_current_span(
            f"chat {config.model_name}", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            if telemetry.record_content():
                span.set_attribute("gen_ai.prompt", telemetry.content(str(messages[-1]["content"])))
            try:
                answer = await self._call(config, endpoint, messages, litellm, tracker, limit)
            except LMError as exc:
                telemetry.mark_error(span, exc)
                raise
            span.set_attributes(
                {
                    "gen_ai.response.model": answer.response_model,
                    "gen_ai.usage.input_tokens": answer.usage.total_input_tokens,
                    "gen_ai.usage.output_tokens": answer.usage.total_output_tokens,
                    "rlm.cost_usd": answer.usage.total_cost,
                    "rlm.attempts": answer.attempts,
                    "gen_ai.response.finish_reasons": (answer.finish_reason,),
                }
            )
            if limit is not None:
                span.set_attribute("gen_ai.request.max_tokens", limit)
            if telemetry.record_content():
                span.set_attribute("gen_ai.completion", telemetry.content(answer.text))
            return answer

    async def _call(
        self,
        config: LMClientConfig,
        endpoint: lm_http.Endpoint | None,
        messages: Messages,
        litellm: Any,
        tracker: UsageTracker | None,
        max_tokens: int | None,
    ) -> LMAnswer:
        started = time.perf_counter()
        attempt = 0
        try:
            async with self._semaphore(config):
                # Retries as a plain loop: a retry library's per-call objects (state, locks,
                # reference cycles) cost more CPU than the call itself on a fast endpoint.
                while True:
                    attempt += 1
                    try:
                        if endpoint is not None:
                            response: Any = await lm_http.post(
                                self._http, endpoint, messages, max_tokens
                            )
                        else:
                            response = await lm_litellm.call(litellm, config, messages, max_tokens)
                        break
                    except Exception as exc:
                        if attempt > config.max_retries or not _is_retryable(exc):
                            raise
                    await asyncio.sleep(_retry_wait(config, attempt))
        except Exception as exc:
            # litellm gives a connection failure status 500: the server answered nothing.
            # litellm says "500" for a server never reached or answering garbage: not so here.
            why = _no_status(exc)
            status = None if why else _status_of(exc)
            http = f" (HTTP {status})" if status else ""
            if why == "unreached" and endpoint is None:
                http += f" (cannot reach {config.api_base or 'its provider'})"
            elif why == "garbled" and endpoint is None:
                http += " (the reply is no chat completion)"
            overflow = overflow_in(str(exc)) if status == 400 else None
            if overflow is not None:
                # The server's window is smaller than we knew: remember it, say so.
                self.windows.learn(config.model_name, overflow, messages)
                raise ContextOverflowError(
                    f"LM call to {config.model_name!r} failed (HTTP 400): the prompt does not "
                    f"fit the model's context window: {str(exc)[:MAX_ERROR_CHARS]}",
                    model=config.model_name,
                    status_code=status,
                    window=self.windows.window(config),
                ) from exc
            raise LMError(
                f"LM call to {config.model_name!r} failed{http} after {attempt} attempt(s): "
                f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}",
                model=config.model_name,
                status_code=status,
            ) from exc
        if endpoint is not None:
            choice = response["choices"][0]
            text = choice["message"].get("content") or ""
            finish = str(choice.get("finish_reason") or "stop")
            served = str(response.get("model") or "")
            usage = _lean_usage(config, endpoint, response, served)
            if usage is None:  # usage only litellm prices
                usage = await _lean_usage_by_litellm(endpoint, response)
        else:
            text = response.choices[0].message.content or ""
            finish = str(getattr(response.choices[0], "finish_reason", None) or "stop")
            served = str(getattr(response, "model", "") or "")
            usage = _litellm_usage(config, response, litellm)
        if finish == "length":
            usage.truncated_calls = 1
        self.windows.observe(config.model_name, messages, usage.total_input_tokens)
        metrics.lm_usage(config.model_name, usage)
        if tracker is not None:
            tracker.record(config.model_name, usage)
        return LMAnswer(
            text=text,
            model=config.model_name,
            usage=usage,
            duration=time.perf_counter() - started,
            attempts=attempt,
            response_model=served or config.litellm_model,
            finish_reason=finish,
        )


def _retry_wait(config: LMClientConfig, attempt: int) -> float:
    """Seconds before the next attempt after `attempt` failed: exponential with jitter,
    initial * 2^(attempt-1) + uniform(0, initial), at most MAX_RETRY_WAIT."""
    initial = config.retry_initial_delay
    try:
        wait = initial * 2.0 ** (attempt - 1) + random.uniform(0, initial)
    except OverflowError:
        wait = MAX_RETRY_WAIT
    return max(0.0, min(wait, MAX_RETRY_WAIT))


def _litellm_usage(config: LMClientConfig, response: Any, litellm: Any) -> ModelUsageSummary:
    usage = getattr(response, "usage", None)
    input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    cost = config.configured_cost(input_tokens, output_tokens)
    if cost is None:
        cost = lm_litellm.cost(litellm, response)
    return ModelUsageSummary(1, input_tokens, output_tokens, cost)


def _lean_usage(
    config: LMClientConfig, endpoint: lm_http.Endpoint, reply: dict[str, Any], served: str
) -> ModelUsageSummary | None:
    """Tokens and cost of a lean reply, as litellm counts them for the same JSON; None when
    only litellm can price it (service tiers, reasoning or audio prices)."""
    usage = reply.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    input_tokens = int(usage.get("prompt_tokens") or 0)
    output_tokens = int(usage.get("completion_tokens") or 0)
    cost = config.configured_cost(input_tokens, output_tokens)
    if cost is None:
        models = (served, endpoint.model)
        cost = lm_prices.cost(endpoint.provider, models, usage, reply.get("service_tier"))
    if cost is None:
        return None
    return ModelUsageSummary(1, input_tokens, output_tokens, cost)


async def _lean_usage_by_litellm(
    endpoint: lm_http.Endpoint, reply: dict[str, Any]
) -> ModelUsageSummary:
    usage = reply.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    litellm = await lm_litellm.loaded()
    response = litellm.ModelResponse(**reply)
    response._hidden_params["custom_llm_provider"] = endpoint.provider
    cost = lm_litellm.cost(litellm, response)
    input_tokens = int(usage.get("prompt_tokens") or 0)
    output_tokens = int(usage.get("completion_tokens") or 0)
    return ModelUsageSummary(1, input_tokens, output_tokens, cost)
