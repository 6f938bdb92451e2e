"""How a completion's end reaches its client: `finished` or `failed`, with long answers in parts.

An answer longer than one part (1 Mi characters) travels as `answer_part` events before the
event it completes, so that answers of any size up to `max_answer_chars` come back whole; a
longer one fails with ANSWER_TOO_LARGE. Partial answers of failures are cut to that limit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator.convert.events import answer_parts, excerpt, in_parts
from rlm_orchestrator.convert.usage import usage_to_proto
from rlm_orchestrator.exceptions import (
    AnswerTooLargeError,
    CompletionTimeoutError,
    ContextWindowExceededError,
    CostLimitExceededError,
    LMError,
    RLMError,
)
from rlm_orchestrator.failures import INTERNAL, failure_kind, kind_to_proto
from rlm_orchestrator.router import UsageTracker
from rlm_orchestrator.service.durable import EventLog
from rlm_orchestrator.service.event_buffer import EventBuffer
from rlm_orchestrator.types import RLMChatCompletion
from rlm_wire.v1 import orchestrator_pb2 as pb

log = logging.getLogger("rlm_orchestrator.service")


@dataclass
class RunningCompletion:
    """A completion the server runs: what ListCompletions shows, and where its events go."""

    completion_id: str
    session_id: str
    root_model: str
    tracker: UsageTracker
    # Where its events go: a buffer for its one stream, or, journaled, its event log.
    events: EventBuffer | EventLog
    started: float = field(default_factory=time.monotonic)
    iterations: int = 0
    task: Any = None  # asyncio.Task running it, once its context is uploaded
    tenant: str = ""  # whose it is: only that tenant sees and controls it

    def info(self) -> pb.CompletionInfo:
        return pb.CompletionInfo(
            completion_id=self.completion_id,
            session_id=self.session_id,
            root_model=self.root_model,
            running_seconds=time.monotonic() - self.started,
            iterations=self.iterations,
            usage=usage_to_proto(self.tracker.summary()),
        )


class Outcome:
    """Queues the end of one completion on its event buffer."""

    def __init__(self, running: RunningCompletion, max_answer_chars: int, excerpt_chars: int):
        self.running = running
        self.max_answer_chars = max_answer_chars
        self.excerpt_chars = excerpt_chars

    async def finish(self, result: RLMChatCompletion) -> None:
        """`finished`, after the answer's parts when it is too long for one message."""
        response = result.response
        if len(response) > self.max_answer_chars:
            message = (
                f"the answer has {len(response)} characters, more than the server's "
                f"max_answer_chars={self.max_answer_chars}"
            )
            limit = self.max_answer_chars
            self.fail(pb.FAILURE_KIND_ANSWER_TOO_LARGE, message, limit=limit)
            return
        finished = pb.CompletionFinished(
            root_model=result.root_model,
            usage=usage_to_proto(result.usage_summary),
            execution_time_seconds=result.execution_time,
            iterations=result.iterations or self.running.iterations,
            answer_source=result.answer_source,
            response_chars=len(response),
        )
        if in_parts(response):
            for part in answer_parts(response):
                # The one producer that waits for its client: the completion is over, and a
                # client that reads slowly must not make the server copy the whole answer.
                await self.running.events.put_waiting(part)
            finished.response_in_parts = True
        else:
            finished.response = response
        self.running.events.put(pb.CompletionEvent(finished=finished))

    def fail_with(self, exc: Exception) -> None:
        """`failed` of the kind the exception carries (`failures.py`)."""
        kind = failure_kind(exc)
        if kind == INTERNAL:
            log.error("completion %s failed", self.running.completion_id, exc_info=exc)
        partial = exc.partial_answer if isinstance(exc, RLMError) else None
        last = exc.last_response if isinstance(exc, RLMError) else None
        limit, status_code = 0.0, 0
        if isinstance(exc, CompletionTimeoutError):
            limit = exc.timeout_seconds or 0.0  # None: not known (0 on the wire)
        elif isinstance(exc, CostLimitExceededError):
            limit = exc.cost_limit or 0.0
        elif isinstance(exc, AnswerTooLargeError):
            limit = self.max_answer_chars  # the loop reads answers up to the server's limit
        elif isinstance(exc, ContextWindowExceededError):
            limit = exc.context_window or 0
        elif isinstance(exc, LMError) and exc.status_code:
            status_code = exc.status_code
        message = f"{type(exc).__name__}: {exc}"
        self.fail(kind_to_proto(kind), message, partial, limit, status_code, last)

    def fail(
        self,
        kind: pb.FailureKind.ValueType,
        message: str,
        partial: str | None = None,
        limit: float = 0.0,
        status_code: int = 0,
        last_response: str | None = None,
    ) -> None:
        """`failed` (after the partial answer's parts when it is long), queued at once: a
        cancelled completion must not wait for its client."""
        running = self.running
        failed = pb.CompletionFailed(
            elapsed_seconds=time.monotonic() - running.started,
            kind=kind,
            message=excerpt(message, self.excerpt_chars)[0],
            usage=usage_to_proto(running.tracker.summary()),
            iterations=running.iterations,
            limit=limit,
            status_code=status_code,
        )
        if last_response is not None:
            failed.last_response = excerpt(last_response, self.excerpt_chars)[0]
        if partial is not None:
            partial = excerpt(partial, self.max_answer_chars)[0]
            if in_parts(partial):
                for part in answer_parts(partial):
                    running.events.put(part)  # never dropped; bounded by max_answer_chars
                failed.partial_answer_in_parts = True
            else:
                failed.partial_answer = partial
        running.events.put(pb.CompletionEvent(failed=failed))
