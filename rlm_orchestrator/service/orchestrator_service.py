"""The Orchestrator servicer: completions and sessions for many clients at once.

Each completion runs as a task of its own, on the shared router and sandbox provider; its
events go to the client's stream through a queue. Whatever ends it (its answer, a limit, the
client hanging up, CancelCompletion, shutdown), its sandbox is released before the RPC ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc

from rlm_orchestrator import events as ev
from rlm_orchestrator.exceptions import (
    CompletionTimeoutError,
    CostLimitExceededError,
    LimitExceededError,
    LMError,
    SandboxError,
)
from rlm_orchestrator.logger import RLMLogger
from rlm_orchestrator.loop import LoopSettings
from rlm_orchestrator.prompts import DEFAULT_SYSTEM_PROMPT
from rlm_orchestrator.router import LMRouter, UsageTracker
from rlm_orchestrator.runner import CompletionRunner
from rlm_orchestrator.sandbox import SandboxProvider, SandboxSpec
from rlm_orchestrator.service.convert import event_to_proto
from rlm_orchestrator.service.convert_usage import usage_to_proto
from rlm_orchestrator.service.settings import ServerSettings
from rlm_orchestrator.session import SessionState
from sandbox_agent._proto.rlm.v1 import orchestrator_pb2 as pb
from sandbox_agent._proto.rlm.v1 import orchestrator_pb2_grpc

log = logging.getLogger("rlm_orchestrator.service")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_FAILURES: list[tuple[type[BaseException], pb.FailureKind.ValueType]] = [
    (CompletionTimeoutError, pb.FAILURE_KIND_TIMEOUT),
    (CostLimitExceededError, pb.FAILURE_KIND_COST_LIMIT),
    (LMError, pb.FAILURE_KIND_LM_ERROR),
    (SandboxError, pb.FAILURE_KIND_SANDBOX_ERROR),
]


@dataclass
class _Running:
    completion_id: str
    session_id: str
    root_model: str
    tracker: UsageTracker
    started: float = field(default_factory=time.monotonic)
    iterations: int = 0
    task: asyncio.Task[Any] | None = None

    def info(self) -> pb.CompletionInfo:
        return pb.CompletionInfo(
            completion_id=self.completion_id,
            session_id=self.session_id,
            root_model=self.root_model,
            running_seconds=time.monotonic() - self.started,
            iterations=self.iterations,
            usage=usage_to_proto(self.tracker.summary()),
        )


@dataclass
class _Session:
    session_id: str
    state: SessionState
    options: pb.CompletionOptions
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)


class OrchestratorService(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(
        self, settings: ServerSettings, router: LMRouter, provider: SandboxProvider
    ) -> None:
        self.settings = settings
        self.router = router
        self.provider = provider
        self.running: dict[str, _Running] = {}
        self.sessions: dict[str, _Session] = {}
        self.accepting = True
        self._logger = RLMLogger(settings.log_dir, "completion") if settings.log_dir else None

    # -- Run -----------------------------------------------------------------------------------

    async def Run(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: Context
    ) -> AsyncIterator[pb.CompletionEvent]:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if len(self.running) >= self.settings.max_concurrent_completions:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self.running)} completions are running, the server's limit",
            )
        start = await self._read_start(request_iterator, context)
        session = await self._session_for(start.session_id, context)
        options = _merged(session.options if session else None, start.options)
        runner, root_model = await self._runner(options, context)
        running = _Running(
            uuid.uuid4().hex,
            start.session_id,
            root_model,
            UsageTracker(options.max_cost if options.HasField("max_cost") else None),
        )
        events: asyncio.Queue[pb.CompletionEvent | None] = asyncio.Queue()

        def emit(event: ev.Event) -> None:
            if isinstance(event, ev.TurnStarted) and event.depth == 0:
                running.iterations = event.iteration + 1
            message = event_to_proto(event)
            if message is not None:
                events.put_nowait(message)

        runner.emit = emit
        yield pb.CompletionEvent(
            started=pb.CompletionStarted(
                completion_id=running.completion_id, session_id=start.session_id
            )
        )
        # `started` doubles as "accepted": the client sends the context only after it, so a
        # refused request (auth, size, options) costs no upload.
        value = await self._read_context(request_iterator, start, context)
        running.task = asyncio.create_task(
            self._complete(runner, running, session, value, start.root_prompt or None, events)
        )
        self.running[running.completion_id] = running
        try:
            while (message := await events.get()) is not None:
                yield message
        finally:
            # Whatever ended the stream (the client hung up, shutdown), the completion stops
            # and its sandbox is released before the RPC ends.
            if not running.task.done():
                running.task.cancel()
                with contextlib.suppress(BaseException):
                    await running.task
            self.running.pop(running.completion_id, None)

    async def _complete(
        self,
        runner: CompletionRunner,
        running: _Running,
        session: _Session | None,
        value: Any,
        root_prompt: str | None,
        events: asyncio.Queue[pb.CompletionEvent | None],
    ) -> None:
        """Runs the completion; its last event is `finished` or `failed`, then the end mark."""
        try:
            if session is not None:
                async with session.lock:
                    session.last_used = time.monotonic()
                    result = await runner.run(
                        value,
                        root_prompt,
                        tracker=running.tracker,
                        root_model=running.root_model,
                        session=session.state,
                    )
                    session.last_used = time.monotonic()
            else:
                result = await runner.run(
                    value, root_prompt, tracker=running.tracker, root_model=running.root_model
                )
            events.put_nowait(
                pb.CompletionEvent(
                    finished=pb.CompletionFinished(
                        response=result.response,
                        root_model=result.root_model,
                        usage=usage_to_proto(result.usage_summary),
                        execution_time_seconds=result.execution_time,
                        iterations=running.iterations,
                    )
                )
            )
        except asyncio.CancelledError:
            events.put_nowait(
                self._failure(pb.FAILURE_KIND_CANCELLED, "the completion was cancelled", running)
            )
            raise
        except Exception as exc:
            kind = next((k for t, k in _FAILURES if isinstance(exc, t)), pb.FAILURE_KIND_INTERNAL)
            if kind == pb.FAILURE_KIND_INTERNAL:
                log.exception("completion %s failed", running.completion_id)
            partial = exc.partial_answer if isinstance(exc, LimitExceededError) else None
            failure = self._failure(kind, f"{type(exc).__name__}: {exc}", running, partial)
            if isinstance(exc, CompletionTimeoutError):
                failure.failed.limit = exc.timeout_seconds
            elif isinstance(exc, CostLimitExceededError):
                failure.failed.limit = exc.cost_limit
            elif isinstance(exc, LMError) and exc.status_code:
                failure.failed.status_code = exc.status_code
            events.put_nowait(failure)
        finally:
            events.put_nowait(None)

    @staticmethod
    def _failure(
        kind: pb.FailureKind.ValueType,
        message: str,
        running: _Running,
        partial: str | None = None,
    ) -> pb.CompletionEvent:
        failed = pb.CompletionFailed(
            elapsed_seconds=time.monotonic() - running.started,
            kind=kind,
            message=message,  # type: ignore[arg-type]
            usage=usage_to_proto(running.tracker.summary()),
            iterations=running.iterations,
        )
        if partial is not None:
            failed.partial_answer = partial
        return pb.CompletionEvent(failed=failed)

    async def _read_start(
        self, requests: AsyncIterator[pb.RunRequest], context: Context
    ) -> pb.CompletionStart:
        """The start message, checked against the server's limits."""
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("kind") != "start":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `start`"
            )
        assert first is not None
        start = first.start
        limit = self.settings.max_context_bytes
        if start.context_bytes > limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a context of {start.context_bytes} bytes exceeds the server's limit of {limit}",
            )
        if start.context_encoding not in (pb.CONTEXT_ENCODING_TEXT, pb.CONTEXT_ENCODING_JSON):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "context_encoding must be TEXT or JSON"
            )
        return start

    async def _read_context(
        self, requests: AsyncIterator[pb.RunRequest], start: pb.CompletionStart, context: Context
    ) -> Any:
        """The context's chunks, decoded."""
        data = bytearray()
        async for message in requests:
            if message.WhichOneof("kind") != "context_chunk":
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "only context_chunk may follow `start`"
                )
            data += message.context_chunk
            if len(data) > start.context_bytes:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"more context than the {start.context_bytes} bytes announced",
                )
        if len(data) != start.context_bytes:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"received {len(data)} context bytes, {start.context_bytes} announced",
            )
        try:
            text = data.decode("utf-8")
            del data
            if start.context_encoding == pb.CONTEXT_ENCODING_JSON:
                value: Any = json.loads(text)
                if not isinstance(value, str | dict | list):
                    kind = type(value).__name__
                    raise ValueError(
                        f"a JSON context must be an object, array or string, not {kind}"
                    )
                return value
            return text
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad context: {exc}")
            raise AssertionError("unreachable") from exc

    async def _session_for(self, session_id: str, context: Context) -> _Session | None:
        if not session_id:
            return None
        session = self.sessions.get(session_id)
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r}")
        return session

    async def _runner(
        self, options: pb.CompletionOptions, context: Context
    ) -> tuple[CompletionRunner, str]:
        """A runner for these options, and its root model (INVALID_ARGUMENT on unknown names)."""
        try:
            router = self.router.with_roles(
                options.model if options.HasField("model") else None,
                options.sub_model if options.HasField("sub_model") else None,
            )
        except LMError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        return self._make_runner(router, options), router.root.model_name

    def _make_runner(self, router: LMRouter, options: pb.CompletionOptions) -> CompletionRunner:
        s = self.settings

        def option(name: str, default: Any) -> Any:
            return getattr(options, name) if options.HasField(name) else default  # type: ignore[arg-type]

        loop_settings = LoopSettings(
            max_depth=option("max_depth", s.max_depth),
            max_iterations=option("max_iterations", s.max_iterations),
            timeout_seconds=option("timeout_seconds", None),
            iteration_timeout_seconds=option("iteration_timeout_seconds", None),
            exec_timeout_seconds=option("exec_timeout_seconds", s.exec_timeout_seconds),
            final_with_code=option("final_with_code", False),
            system_prompt=option("system_prompt", DEFAULT_SYSTEM_PROMPT),
        )
        spec = SandboxSpec(session_id="", exec_timeout_seconds=loop_settings.exec_timeout_seconds)
        return CompletionRunner(router, self.provider, loop_settings, spec, logger=self._logger)

    # -- management ----------------------------------------------------------------------------

    async def CancelCompletion(
        self, request: pb.CancelCompletionRequest, context: Context
    ) -> pb.CancelCompletionResponse:
        running = self.running.get(request.completion_id)
        if running is None or running.task is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no running completion {request.completion_id!r}"
            )
        assert running is not None and running.task is not None
        running.task.cancel()
        return pb.CancelCompletionResponse()

    async def ListCompletions(
        self, request: pb.ListCompletionsRequest, context: Context
    ) -> pb.ListCompletionsResponse:
        return pb.ListCompletionsResponse(completions=[r.info() for r in self.running.values()])

    async def GetCompletion(
        self, request: pb.GetCompletionRequest, context: Context
    ) -> pb.CompletionInfo:
        running = self.running.get(request.completion_id)
        if running is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no running completion {request.completion_id!r}"
            )
        assert running is not None
        return running.info()

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.SessionInfo:
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        runner, _ = await self._runner(request.options, context)
        state = await runner.new_session()
        session = _Session(uuid.uuid4().hex, state, request.options)
        self.sessions[session.session_id] = session
        return pb.SessionInfo(session_id=session.session_id)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: Context
    ) -> pb.CloseSessionResponse:
        session = self.sessions.pop(request.session_id, None)
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
        assert session is not None
        async with session.lock:  # let a running completion of the session finish first
            await self.provider.release(session.state.sandbox)
        return pb.CloseSessionResponse()

    # -- lifecycle -----------------------------------------------------------------------------

    async def reap_idle_sessions(self) -> None:
        """Close sessions unused for longer than the TTL (clients that forgot to close)."""
        deadline = time.monotonic() - self.settings.session_ttl_seconds
        for session in list(self.sessions.values()):
            if session.last_used < deadline and not session.lock.locked():
                self.sessions.pop(session.session_id, None)
                await self.provider.release(session.state.sandbox)

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new work, give running completions the grace period, cancel the rest."""
        self.accepting = False
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for session in list(self.sessions.values()):
            self.sessions.pop(session.session_id, None)
            await self.provider.release(session.state.sandbox)


def _merged(
    defaults: pb.CompletionOptions | None, options: pb.CompletionOptions
) -> pb.CompletionOptions:
    """Session defaults overridden by the fields the request sets."""
    merged = pb.CompletionOptions()
    if defaults is not None:
        merged.CopyFrom(defaults)
    merged.MergeFrom(options)
    return merged
