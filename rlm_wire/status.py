"""Where the agent's exceptions become gRPC statuses: handlers raise, `maps_errors` answers.

A handler refuses a call by raising one of the small exceptions below (`InvalidArgument`,
`NotFound`...); its servicer class, decorated with `@maps_errors()`, ends the call with the
exception's code and its message as the details. `abort` is the one call of `context.abort`:
what refuses a call before any handler runs (the bearer-token check, undecodable messages)
calls it too. grpc and the standard library only: the orchestrator's servicers use the same
decorator with their own mapping, from its exception tree (`rlm_orchestrator/service/status.py`).

A class decorator rather than a server interceptor: the mapping travels with the servicer, so
a servicer registered on any server (tests build bare ones; `add_router_service` takes the
caller's) answers the same statuses, where an interceptor would have to be installed on each
server that hosts it. It wraps every RPC method the class defines (those of its generated base
class), so a new method cannot be forgotten, and each kind once: a coroutine (unary-unary,
stream-unary, and streams written with `context.write`) or an async generator (responses
streamed by `yield`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, NamedTuple, NoReturn, TypeVar

import grpc

_Servicer = TypeVar("_Servicer", bound=type)


class Status(NamedTuple):
    """What ends a call: the code, its details, and trailing metadata."""

    code: grpc.StatusCode
    details: str
    metadata: Sequence[tuple[str, str]] = ()


StatusOf = Callable[[BaseException], "Status | None"]


class StatusError(Exception):
    """Ends the call it is raised in with `code`; the message is the status's details."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def status(self) -> Status:
        return Status(self.code, str(self))


class InvalidArgument(StatusError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StatusError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(StatusError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(StatusError):
    code = grpc.StatusCode.ABORTED


class Unauthenticated(StatusError):
    code = grpc.StatusCode.UNAUTHENTICATED


def agent_status(exc: BaseException) -> Status | None:
    """The status of one of the agent's exceptions; None for anything else (a bug: gRPC
    answers UNKNOWN)."""
    return exc.status() if isinstance(exc, StatusError) else None


async def abort(context: Any, status: Status) -> NoReturn:
    """Ends the call with `status` (raises, as `context.abort` does)."""
    end: Callable[..., Awaitable[NoReturn]] = context.abort
    await end(status.code, status.details, tuple(status.metadata))


def _guarded(method: Callable[..., Any], status_of: StatusOf) -> Callable[..., Any]:
    """`method` (self, request or iterator, context), ending the call with the status of what
    it raises when it has one."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_out(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            responses = method(self, request, context)
            try:
                async for response in responses:
                    yield response
            except Exception as exc:
                if (status := status_of(exc)) is None:
                    raise
                await abort(context, status)
            finally:
                await responses.aclose()  # now, not whenever the generator is collected

        return stream_out

    @functools.wraps(method)
    async def call(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if (status := status_of(exc)) is None:
                raise
            await abort(context, status)

    return call


def _rpc_names(servicer: type) -> set[str]:
    """The RPC methods of the generated `*Servicer` base classes (`*_pb2_grpc` modules)."""
    return {
        name
        for base in servicer.__mro__[1:]
        if base.__module__.endswith("_pb2_grpc")
        for name, value in vars(base).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }


def maps_errors(status_of: StatusOf = agent_status) -> Callable[[_Servicer], _Servicer]:
    """Class decorator for a servicer: each RPC method it defines ends its call with the status
    `status_of` gives what it raises; what has none (a bug) is left to gRPC (UNKNOWN)."""

    def decorate(servicer: _Servicer) -> _Servicer:
        for name in _rpc_names(servicer) & set(vars(servicer)):
            setattr(servicer, name, _guarded(vars(servicer)[name], status_of))
        return servicer

    return decorate
