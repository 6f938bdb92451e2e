"""AsyncClient: the orchestrator service from asyncio code, shaped like `RLM`.

Contexts of any size are sent in 1 MiB chunks. Every gRPC failure is turned into one of our
exceptions at one place (`_errors.rpc_error`: the ClientError subclass whose `codes` hold the
status), and a failed completion raises the same exception types as the in-process `RLM`
(CompletionTimeoutError, CostLimitExceededError, LMError...: `failures.py`).

`timeout` bounds each call that has a natural end (the unary ones, the LM router's) and the
wait for the server to take a completion's stream; never a running completion (its own
`timeout_seconds` option does). `max_retries` re-sends a unary call that met UNAVAILABLE,
except those that would do the work twice: completions and LM calls are never re-sent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import grpc

from rlm_orchestrator import events as ev
from rlm_orchestrator import telemetry
from rlm_orchestrator.client import _router as router
from rlm_orchestrator.client._errors import joined, rpc_error
from rlm_orchestrator.client._options import CompletionOptions, encode_context, options_message
from rlm_orchestrator.convert.events import event_from_proto
from rlm_orchestrator.convert.usage import usage_from_proto
from rlm_orchestrator.exceptions import ClientError, ConfigurationError, ServerUnavailableError
from rlm_orchestrator.failures import exception_for, kind_from_proto
from rlm_orchestrator.types import RLMChatCompletion
from rlm_wire.auth import bearer_metadata, channel_credentials
from rlm_wire.v1 import lm_router_pb2, lm_router_pb2_grpc, orchestrator_pb2_grpc
from rlm_wire.v1 import orchestrator_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
# The server's bearer token when none is given (the CLI reads the same variable).
TOKEN_ENV = "RLM_SERVER_TOKEN"
DEFAULT_TIMEOUT = 60.0  # seconds
DEFAULT_MAX_RETRIES = 2
_RETRY_FIRST_WAIT, _RETRY_MAX_WAIT = 0.25, 4.0  # seconds, doubling between the two
CHUNK_BYTES = 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Long completions can be silent for minutes; the server allows a ping every 10 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class CompletionSummary:
    """A running completion, as ListCompletions / GetCompletion report it."""

    completion_id: str
    session_id: str
    root_model: str
    running_seconds: float
    iterations: int
    total_cost: float


def _summary(info: pb.CompletionInfo) -> CompletionSummary:
    return CompletionSummary(
        info.completion_id,
        info.session_id,
        info.root_model,
        info.running_seconds,
        info.iterations,
        info.usage.total_cost,
    )


def check_limits(timeout: float | None, max_retries: int) -> None:
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"timeout must be positive or None, not {timeout!r}")
    if max_retries < 0:
        raise ConfigurationError(f"max_retries must be 0 or more, not {max_retries!r}")


class AsyncClient:
    """A connection to an orchestrator server. Use `async with`, or call `close()`.

    `token`: the server's bearer token; None reads RLM_SERVER_TOKEN ("" sends none).
    `tls`, `ca_file`, `cert_file`, `key_file`: TLS, with a private CA, and a client
    certificate for mTLS. `timeout`: seconds per call (None: no limit; see the module's
    docstring for what it bounds). `max_retries`: re-sends of a unary call after UNAVAILABLE.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        check_limits(timeout, max_retries)
        self.target, self.timeout, self.max_retries = target, timeout, max_retries
        if tls or ca_file or cert_file:
            credentials = channel_credentials(
                *(Path(f) if f else None for f in (ca_file, cert_file, key_file))
            )
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        if token is None:
            token = os.environ.get(TOKEN_ENV)
        self._metadata: Sequence[tuple[str, str]] = bearer_metadata(token) if token else ()
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self._router = lm_router_pb2_grpc.LMRouterStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def stream(
        self,
        context: Any,
        root_prompt: str | None = None,
        *,
        session_id: str = "",
        **options: Unpack[CompletionOptions],
    ) -> AsyncIterator[ev.StreamEvent]:
        """The completion's events as they happen: CompletionStarted first, then progress
        events, then CompletionFinished or CompletionFailed. Leaving early cancels it."""
        encoding, data = encode_context(context)
        start = pb.CompletionStart(
            root_prompt=root_prompt or "",
            context_encoding=encoding,  # type: ignore[arg-type]
            context_bytes=len(data),
            session_id=session_id,
            options=options_message(options),
        )

        accepted = asyncio.Event()
        ended = False

        async def requests() -> AsyncIterator[pb.RunRequest]:
            # The server's headers first: writing before them can make grpc.aio report a
            # refusal (a wrong token, shutdown) as INTERNAL, when its write races the status.
            await call.initial_metadata()
            if call.done():
                return
            yield pb.RunRequest(start=start)
            await accepted.wait()  # the server checked the request: now upload the context
            if ended:
                return  # refused before acceptance: nothing to upload
            for offset in range(0, len(data), CHUNK_BYTES):
                yield pb.RunRequest(context_chunk=data[offset : offset + CHUNK_BYTES])

        # The caller's trace (if any) continues on the server: W3C trace context in metadata.
        traceparent = telemetry.traceparent()
        metadata = (
            (*self._metadata, ("traceparent", traceparent)) if traceparent else self._metadata
        )
        call = self._stub.Run(requests(), metadata=metadata)
        parts: list[str] = []  # of an answer too long for one message
        try:
            # The server sends its headers at once: a silent one fails within the timeout.
            try:
                await asyncio.wait_for(call.initial_metadata(), self.timeout)
            except TimeoutError:
                raise self._silent() from None
            async for message in call:
                accepted.set()
                if message.WhichOneof("kind") == "answer_part":
                    parts.append(message.answer_part.text)
                    continue
                yield self._stream_event(message, parts)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from exc
        finally:
            ended = True
            accepted.set()  # lets the request generator finish
            call.cancel()  # a no-op once the stream has ended; cancels it if the caller left

    async def attach(
        self, completion_id: str, *, after_event: int = 0
    ) -> AsyncIterator[ev.StreamEvent]:
        """A journaled completion's events after the `after_event`-th (events count from 1,
        CompletionStarted included), then its live ones until it ends, from whichever server
        runs it: for a stream that was cut, or to follow another client's completion.
        Leaving early does not cancel it (`cancel` does)."""
        request = pb.AttachCompletionRequest(completion_id=completion_id, after_event=after_event)
        call = self._stub.AttachCompletion(request, metadata=self._metadata)
        parts: list[str] = []
        try:
            async for message in call:
                if message.WhichOneof("kind") == "answer_part":
                    parts.append(message.answer_part.text)
                    continue
                yield self._stream_event(message, parts)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from exc
        finally:
            call.cancel()

    def _silent(self) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"DEADLINE_EXCEEDED: no answer from {self.target} within the client's timeout "
            f"({self.timeout:g} s)",
            code="DEADLINE_EXCEEDED",
        )

    @staticmethod
    def _stream_event(message: pb.CompletionEvent, parts: list[str]) -> ev.StreamEvent:
        kind = message.WhichOneof("kind")
        if kind == "started":
            return ev.CompletionStarted(message.started.completion_id, message.started.session_id)
        if kind == "finished":
            f = message.finished
            response = joined(parts, f.response_chars) if f.response_in_parts else f.response
            usage = usage_from_proto(f.usage)
            result = RLMChatCompletion(
                f.root_model,
                None,
                response,
                usage,
                f.execution_time_seconds,
                iterations=f.iterations,
                answer_source=f.answer_source,
            )
            return ev.CompletionFinished(result, f.iterations)
        if kind == "failed":
            x = message.failed
            partial = x.partial_answer if x.HasField("partial_answer") else None
            if x.partial_answer_in_parts:
                partial = joined(parts, None)
            return ev.CompletionFailed(
                kind_from_proto(x.kind),
                x.message,
                partial,
                usage_from_proto(x.usage),
                x.iterations,
                x.limit,
                x.elapsed_seconds,
                x.status_code or None,
                x.last_response if x.HasField("last_response") else None,
            )
        event = event_from_proto(message)
        if event is None:
            raise ClientError(f"unexpected event {kind!r} from the server")
        return event

    async def completion(
        self,
        context: Any,
        root_prompt: str | None = None,
        *,
        session_id: str = "",
        on_event: ev.EventHandler | None = None,
        **options: Unpack[CompletionOptions],
    ) -> RLMChatCompletion:
        """Like `RLM.completion`: the result, or the exception the RLM would raise."""
        async for event in self.stream(context, root_prompt, session_id=session_id, **options):
            if isinstance(event, ev.CompletionFinished):
                event.result.prompt = context
                return event.result
            if isinstance(event, ev.CompletionFailed):
                raise exception_for(event)
            if on_event is not None and not isinstance(event, ev.CompletionStarted):
                on_event(event)
        raise ClientError("the completion stream ended without a result")

    async def _unary(
        self, method: Any, request: Any, *, retry: bool = True, timeout: float | None = None
    ) -> Any:
        """One unary call under the client's timeout (or `timeout`), re-sent after
        UNAVAILABLE up to `max_retries` times when `retry` (with a doubling wait): the
        retries included, it ends within the timeout."""
        limit = timeout if timeout is not None else self.timeout
        clock = asyncio.get_running_loop().time
        end = None if limit is None else clock() + limit
        attempts = 1 + (self.max_retries if retry else 0)
        for attempt in range(attempts):
            left = None if end is None else max(end - clock(), 0.001)
            try:
                return await method(request, metadata=self._metadata, timeout=left)
            except grpc.aio.AioRpcError as exc:
                error = rpc_error(exc)
                wait = min(_RETRY_FIRST_WAIT * 2**attempt, _RETRY_MAX_WAIT)
                if (
                    exc.code() != grpc.StatusCode.UNAVAILABLE
                    or attempt + 1 == attempts
                    or (end is not None and clock() + wait >= end)
                ):
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and limit is not None:
                        error = ServerUnavailableError(
                            f"{error} (the client's timeout: {limit:g} s)", code=error.code
                        )
                    raise error from exc
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def cancel(self, completion_id: str) -> None:
        """Cancels a running completion (NotFoundError when it is not running)."""
        await self._unary(
            self._stub.CancelCompletion, pb.CancelCompletionRequest(completion_id=completion_id)
        )

    async def list_completions(self) -> list[CompletionSummary]:
        reply = await self._unary(self._stub.ListCompletions, pb.ListCompletionsRequest())
        return [_summary(info) for info in reply.completions]

    async def get_completion(self, completion_id: str) -> CompletionSummary:
        """A running completion (NotFoundError when it is not running)."""
        return _summary(
            await self._unary(
                self._stub.GetCompletion, pb.GetCompletionRequest(completion_id=completion_id)
            )
        )

    async def create_session(self, **options: Unpack[CompletionOptions]) -> AsyncSession:
        """A multi-turn session: one sandbox whose variables persist across completions;
        `options` become the default of each of its completions."""
        request = pb.CreateSessionRequest(options=options_message(options))
        reply = await self._unary(self._stub.CreateSession, request)
        return AsyncSession(self, reply.session_id)

    async def close_session(self, session_id: str) -> None:
        """NotFoundError when there is no such session."""
        await self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))

    # -- the server's LM router (rlm.v1.LMRouter): one LM call, no RLM loop ------------------

    async def list_models(self) -> router.ModelList:
        """The models the server registered, and which answers each depth by default."""
        reply = await self._unary(self._router.ListModels, lm_router_pb2.ListModelsRequest())
        return router.models_from_proto(reply)

    async def complete(
        self,
        prompt: router.Prompt,
        *,
        model: str | None = None,
        depth: int = 0,
        timeout: float | None = None,
    ) -> router.LMCompletion:
        """One LM answer, made by the server with its keys: `model` a registered name (else
        depth 0: the root model, deeper: the sub model); `prompt` a string or a list of
        {"role", "content"} messages. NotFoundError for an unknown model, LMError-like
        ClientErrors when the provider failed after the server's retries. Never re-sent."""
        request = router.request(prompt, model, depth)
        reply = await self._unary(self._router.Complete, request, retry=False, timeout=timeout)
        return router.completion_from_proto(reply)

    async def complete_batch(
        self,
        prompts: Sequence[str],
        *,
        model: str | None = None,
        depth: int = 0,
        timeout: float | None = None,
    ) -> router.LMBatch:
        """Many prompts answered concurrently (within the model's cap on the server), in their
        order; a failed one is an LMError in its slot. Never re-sent."""
        request = lm_router_pb2.LMBatchRequest(
            prompts=list(prompts), model=model or "", depth=depth
        )
        reply = await self._unary(self._router.CompleteBatch, request, retry=False, timeout=timeout)
        return router.batch_from_proto(reply, model)


class AsyncSession:
    """A server-side session; `async with` closes it."""

    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    async def completion(
        self,
        context: Any,
        root_prompt: str | None = None,
        *,
        on_event: ev.EventHandler | None = None,
        **options: Unpack[CompletionOptions],
    ) -> RLMChatCompletion:
        return await self.client.completion(
            context, root_prompt, session_id=self.session_id, on_event=on_event, **options
        )

    def stream(
        self, context: Any, root_prompt: str | None = None, **options: Unpack[CompletionOptions]
    ) -> AsyncIterator[ev.StreamEvent]:
        return self.client.stream(context, root_prompt, session_id=self.session_id, **options)

    async def close(self) -> None:
        await self.client.close_session(self.session_id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
