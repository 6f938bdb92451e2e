"""INVALID_ARGUMENT for request messages that do not decode, on any grpc.aio server.

grpc-python deserializes requests itself, before or while a servicer runs; when the bytes are
not a valid message the exception escapes its machinery and the caller gets UNKNOWN
("Unexpected <class 'google.protobuf.message.DecodeError'>..."), as if the server had a bug.
This interceptor swaps each handler's deserializer for one that never raises: undecodable
bytes become an `Undecodable` marker, and the wrapped behaviour ends the call with
INVALID_ARGUMENT (`status.abort`) the moment it meets one, whether the request came as the
unary argument, from the request iterator, or from `context.read()`. Shared by the sandbox
agent and the orchestrator server; grpc and the standard library only.

It aborts rather than raising `InvalidArgument`: a request iterator may be read by a task of
the servicer's own (the agent's answers to sub-calls), where an exception would never reach
the handler's status mapping.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from rlm_wire.status import InvalidArgument, abort

log = logging.getLogger("rlm.decoding")


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer returns for bytes that are not a valid request message."""

    size: int
    error: str

    def details(self, method: str) -> str:
        return f"{method}: a request message of {self.size} bytes does not decode ({self.error})"


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything a custom deserializer raises
            return Undecodable(len(data), f"{type(exc).__name__}: {exc}"[:200])

    return deserialize


class _CheckingContext:
    """The servicer's context, with `read()` refusing undecodable messages."""

    def __init__(self, context: Any, method: str) -> None:
        self._context = context
        self._method = method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        return await _checked(await self._context.read(), self._context, self._method)


async def _checked(request: Any, context: Any, method: str) -> Any:
    if isinstance(request, Undecodable):
        log.warning("refused %s: undecodable request (%d bytes)", method, request.size)
        await abort(context, InvalidArgument(request.details(method)).status())
    return request


async def _checked_stream(requests: AsyncIterator[Any], context: Any, method: str) -> Any:
    async for request in requests:
        yield await _checked(request, context, method)


def _wrap(behavior: Callable[..., Any], request_streaming: bool, method: str) -> Any:
    """`behavior` with its request(s) checked; the same kind of callable (grpc looks)."""

    def arguments(request: Any, context: Any) -> tuple[Any, Any]:
        checked_context = _CheckingContext(context, method)
        if request_streaming:
            return _checked_stream(request, context, method), checked_context
        return request, checked_context

    if inspect.isasyncgenfunction(behavior):

        async def stream_out(request: Any, context: Any) -> AsyncIterator[Any]:
            if not request_streaming:
                await _checked(request, context, method)
            async for response in behavior(*arguments(request, context)):
                yield response

        return stream_out

    async def call(request: Any, context: Any) -> Any:
        if not request_streaming:
            await _checked(request, context, method)
        result: Awaitable[Any] = behavior(*arguments(request, context))
        return await result

    return call


_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_BEHAVIORS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def checked_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` answering INVALID_ARGUMENT to undecodable requests (async behaviours only)."""
    kind = (handler.request_streaming, handler.response_streaming)
    behavior = getattr(handler, _BEHAVIORS[kind])
    is_async = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    if handler.request_deserializer is None or behavior is None or not is_async:
        return handler  # raw bytes always "decode"; sync handlers are not ours
    return _FACTORIES[kind](
        _wrap(behavior, handler.request_streaming, method),
        request_deserializer=_lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class InvalidMessageInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Undecodable request messages get INVALID_ARGUMENT instead of UNKNOWN.

    Install it after the bearer-token interceptor, so that nothing from an unauthenticated
    caller is ever decoded.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return checked_handler(handler, handler_call_details.method)
