"""AsyncClient: the orchestrator service from asyncio code, shaped like `RLM`.

Contexts of any size are sent in 1 MiB chunks. Every gRPC failure is turned into one of our
exceptions at one place (`_rpc_error`: the ClientError subclass whose `codes` hold the status),
and a failed completion raises the same exception types as the in-process `RLM`
(CompletionTimeoutError, CostLimitExceededError, LMError...: `failures.py`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from rlm_orchestrator import events as ev
from rlm_orchestrator import telemetry
from rlm_orchestrator.convert.events import SHUTDOWN_METADATA_KEY, event_from_proto
from rlm_orchestrator.convert.usage import usage_from_proto
from rlm_orchestrator.exceptions import (
    AuthenticationError,
    ClientError,
    InvalidRequestError,
    ResourceExhaustedError,
    ServerShutdownError,
    ServerUnavailableError,
)
from rlm_orchestrator.failures import exception_for, kind_from_proto
from rlm_orchestrator.types import RLMChatCompletion
from rlm_wire.auth import bearer_metadata, channel_credentials
from rlm_wire.v1 import orchestrator_pb2 as pb
from rlm_wire.v1 import orchestrator_pb2_grpc

CHUNK_BYTES = 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Long completions can be silent for minutes; the server allows a ping every 10 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
]
# The statuses each ClientError subclass stands for (`codes`): the same the server's
# handlers raise them with.
_CODE_ERRORS: dict[str, type[ClientError]] = {
    code: error
    for error in (
        AuthenticationError,
        InvalidRequestError,
        ResourceExhaustedError,
        ServerUnavailableError,
    )
    for code in error.codes
}


def _rpc_error(exc: grpc.aio.AioRpcError) -> ClientError:
    """The one place where a gRPC status becomes one of our exceptions."""
    message = f"{exc.code().name}: {exc.details()}"
    trailing = exc.trailing_metadata() or ()
    if exc.code() == grpc.StatusCode.UNAVAILABLE and any(
        key == SHUTDOWN_METADATA_KEY for key, _ in trailing
    ):
        return ServerShutdownError(message)
    error_type = _CODE_ERRORS.get(exc.code().name, ClientError)
    return error_type(message, code=exc.code().name)


def options_message(options: dict[str, Any]) -> pb.CompletionOptions:
    """CompletionOptions from keyword arguments (unknown names are an error, not ignored)."""
    known = set(pb.CompletionOptions.DESCRIPTOR.fields_by_name)
    unknown = set(options) - known
    if unknown:
        raise InvalidRequestError(
            f"unknown completion options {sorted(unknown)}; known: {sorted(known)}",
            code="INVALID_ARGUMENT",
        )
    return pb.CompletionOptions(**{k: v for k, v in options.items() if v is not None})


def _joined(parts: list[str], expected_chars: int | None) -> str:
    """An answer sent in parts, whole again (ClientError when some went missing)."""
    text = "".join(parts)
    parts.clear()
    if expected_chars is not None and len(text) != expected_chars:
        raise ClientError(
            f"the answer arrived incomplete: {len(text)} of {expected_chars} characters",
            code="DATA_LOSS",
        )
    return text


def _encode(context: Any) -> tuple[int, bytes]:
    if isinstance(context, str):
        return pb.CONTEXT_ENCODING_TEXT, context.encode("utf-8")
    if isinstance(context, dict | list):
        return pb.CONTEXT_ENCODING_JSON, json.dumps(context, default=str).encode("utf-8")
    raise InvalidRequestError(
        f"context must be a str, dict or list, not {type(context).__name__}",
        code="INVALID_ARGUMENT",
    )


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


class AsyncClient:
    """A connection to an orchestrator server. Use `async with`, or call `close()`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        tls: bool = False,
    ) -> None:
        if tls or ca_file or cert_file:
            credentials = channel_credentials(ca_file, cert_file, key_file)
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._metadata: Sequence[tuple[str, str]] = bearer_metadata(token) if token else ()
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def stream(
        self, context: Any, root_prompt: str | None = None, *, session_id: str = "", **options: Any
    ) -> AsyncIterator[ev.StreamEvent]:
        """The completion's events as they happen: CompletionStarted first, then progress
        events, then CompletionFinished or CompletionFailed. Leaving early cancels it."""
        encoding, data = _encode(context)
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
            async for message in call:
                accepted.set()
                if message.WhichOneof("kind") == "answer_part":
                    parts.append(message.answer_part.text)
                    continue
                yield self._stream_event(message, parts)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        finally:
            ended = True
            accepted.set()  # lets the request generator finish
            call.cancel()  # a no-op once the stream has ended; cancels it if the caller left

    @staticmethod
    def _stream_event(message: pb.CompletionEvent, parts: list[str]) -> ev.StreamEvent:
        kind = message.WhichOneof("kind")
        if kind == "started":
            return ev.CompletionStarted(message.started.completion_id, message.started.session_id)
        if kind == "finished":
            f = message.finished
            response = _joined(parts, f.response_chars) if f.response_in_parts else f.response
            result = RLMChatCompletion(
                f.root_model, None, response, usage_from_proto(f.usage), f.execution_time_seconds
            )
            return ev.CompletionFinished(result, f.iterations)
        if kind == "failed":
            x = message.failed
            partial = x.partial_answer if x.HasField("partial_answer") else None
            if x.partial_answer_in_parts:
                partial = _joined(parts, None)
            return ev.CompletionFailed(
                kind_from_proto(x.kind),
                x.message,
                partial,
                usage_from_proto(x.usage),
                x.iterations,
                x.limit,
                x.elapsed_seconds,
                x.status_code or None,
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
        **options: Any,
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

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc

    async def cancel(self, completion_id: str) -> None:
        await self._unary(
            self._stub.CancelCompletion, pb.CancelCompletionRequest(completion_id=completion_id)
        )

    async def list_completions(self) -> list[CompletionSummary]:
        reply = await self._unary(self._stub.ListCompletions, pb.ListCompletionsRequest())
        return [_summary(info) for info in reply.completions]

    async def get_completion(self, completion_id: str) -> CompletionSummary:
        return _summary(
            await self._unary(
                self._stub.GetCompletion, pb.GetCompletionRequest(completion_id=completion_id)
            )
        )

    async def create_session(self, **options: Any) -> AsyncSession:
        """A multi-turn session: one sandbox whose variables persist across completions."""
        request = pb.CreateSessionRequest(options=options_message(options))
        reply = await self._unary(self._stub.CreateSession, request)
        return AsyncSession(self, reply.session_id)

    async def close_session(self, session_id: str) -> None:
        await self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))


class AsyncSession:
    """A server-side session; `async with` closes it."""

    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    async def completion(
        self, context: Any, root_prompt: str | None = None, **options: Any
    ) -> RLMChatCompletion:
        return await self.client.completion(
            context, root_prompt, session_id=self.session_id, **options
        )

    def stream(
        self, context: Any, root_prompt: str | None = None, **options: Any
    ) -> AsyncIterator[ev.StreamEvent]:
        return self.client.stream(context, root_prompt, session_id=self.session_id, **options)

    async def close(self) -> None:
        await self.client.close_session(self.session_id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
