"""The rlm.v1.LMRouter gRPC service: a thin adapter onto the orchestrator's own LMRouter.

It wraps the very router instance the loops use, so per-model concurrency caps and retries are
shared between local calls and gRPC callers. API keys never appear in answers or errors.
Refusals are raised (an RLMError with its status, `status.py`): an LM's failure ends the call
with the status its HTTP status stands for (LMError.code).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from rlm_orchestrator.convert.usage import model_usage_to_proto, usage_to_proto
from rlm_orchestrator.exceptions import (
    InvalidRequestError,
    LMError,
    NotFoundError,
    ServerUnavailableError,
)
from rlm_orchestrator.router import LMAnswer, LMRouter, Messages
from rlm_orchestrator.service.status import maps_rlm_errors
from rlm_orchestrator.types import UsageSummary
from rlm_wire.v1 import lm_router_pb2 as pb
from rlm_wire.v1 import lm_router_pb2_grpc

_ROLES = frozenset({"system", "user", "assistant"})
_T = TypeVar("_T")
_DEADLINE_MARGIN = 0.05  # seconds


def _messages_of(request: pb.LMRequest) -> Messages:
    if request.WhichOneof("input") == "conversation":
        messages = request.conversation.messages
        if not messages:
            raise InvalidRequestError("the conversation has no messages")
        if bad := sorted({m.role for m in messages} - _ROLES):
            raise InvalidRequestError(f"unknown message role(s) {bad}; use one of {sorted(_ROLES)}")
        return [{"role": m.role, "content": m.content} for m in messages]
    if not request.prompt:  # also the case when neither input is set
        raise InvalidRequestError("empty prompt: set prompt or conversation")
    return [{"role": "user", "content": request.prompt}]


def _response(answer: LMAnswer) -> pb.LMResponse:
    return pb.LMResponse(
        text=answer.text,
        model=answer.model,
        usage=model_usage_to_proto(answer.model, answer.usage),
        duration_seconds=answer.duration,
        attempts=answer.attempts,
    )


@maps_rlm_errors
class LMRouterService(lm_router_pb2_grpc.LMRouterServicer):
    """Complete, CompleteBatch and ListModels over one shared LMRouter."""

    def __init__(self, router: LMRouter) -> None:
        self.router = router

    def _redact(self, text: str) -> str:
        # Provider errors may echo request details; no registered key may leave the server.
        for config in self.router.models.values():
            if config.api_key:
                text = text.replace(config.api_key, "[redacted]")
        return text

    def _check_model(self, model: str, depth: int) -> None:
        try:
            self.router.resolve(model or None, depth)
        except LMError as exc:
            raise NotFoundError(self._redact(str(exc))) from exc

    async def _within_deadline(self, work: Awaitable[_T], context: Any, what: str) -> _T:
        """`work`, cancelled when the call's deadline passes (no deadline: no limit)."""
        remaining = context.time_remaining()
        limit = None
        if remaining is not None:
            # Give up a little early, so the caller reads why rather than its own bare timeout.
            limit = remaining - min(_DEADLINE_MARGIN, remaining / 10)
        try:
            async with asyncio.timeout(limit):
                return await work
        except TimeoutError as exc:
            raise ServerUnavailableError(
                f"{what} did not finish within the call's deadline ({remaining:.3f} s)",
                code="DEADLINE_EXCEEDED",
            ) from exc

    async def Complete(
        self, request: pb.LMRequest, context: grpc.aio.ServicerContext[pb.LMRequest, Any]
    ) -> pb.LMResponse:
        messages = _messages_of(request)
        self._check_model(request.model, request.depth)
        work = self.router.complete(messages, model=request.model or None, depth=request.depth)
        try:
            answer = await self._within_deadline(work, context, "the LM call")
        except LMError as exc:  # its status follows from the provider's HTTP status
            redacted = self._redact(str(exc))
            raise LMError(redacted, model=exc.model, status_code=exc.status_code) from exc
        return _response(answer)

    async def _one(self, prompt: str, model: str, depth: int) -> LMAnswer:
        if not prompt:
            raise ValueError("empty prompt")
        return await self.router.complete(prompt, model=model or None, depth=depth)

    async def CompleteBatch(
        self, request: pb.LMBatchRequest, context: grpc.aio.ServicerContext[pb.LMBatchRequest, Any]
    ) -> pb.LMBatchResponse:
        self._check_model(request.model, request.depth)
        # The router's per-model semaphore caps how many of these run at once.
        work = asyncio.gather(
            *(self._one(p, request.model, request.depth) for p in request.prompts),
            return_exceptions=True,
        )
        outcomes = await self._within_deadline(work, context, "the batch")
        usage, results = UsageSummary(), []
        for outcome in outcomes:
            if isinstance(outcome, LMAnswer):
                usage.merge(UsageSummary({outcome.model: outcome.usage}))
                results.append(pb.LMBatchResult(response=_response(outcome)))
            else:
                error = str(outcome) if isinstance(outcome, LMError) else repr(outcome)
                results.append(pb.LMBatchResult(error=self._redact(error)))
        return pb.LMBatchResponse(results=results, usage=usage_to_proto(usage))

    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, Any],
    ) -> pb.ListModelsResponse:
        models = [
            pb.ModelInfo(
                name=c.model_name,
                backend=c.backend,
                litellm_model=c.litellm_model,
                max_concurrency=c.max_concurrency,
            )
            for c in self.router.models.values()
        ]
        return pb.ListModelsResponse(
            models=models,
            root_model=self.router.root.model_name,
            sub_model=self.router.sub.model_name,
        )


def add_router_service(server: grpc.aio.Server, router: LMRouter) -> LMRouterService:
    """Registers an LMRouterService over `router` on `server` (before it starts)."""
    service = LMRouterService(router)
    lm_router_pb2_grpc.add_LMRouterServicer_to_server(service, server)
    return service
