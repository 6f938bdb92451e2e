"""Where exceptions become statuses (servers) and statuses and failures become exceptions (SDK).

A servicer decorated with `maps_errors` ends its calls with the status of what its handlers
raise, for every kind of handler grpc.aio has: coroutines (unary-unary, stream-unary, and
streams written with `context.write`) and async generators (unary-stream, stream-stream), after
messages were sent too. The failure-kind table covers every FailureKind of the proto.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from rlm_orchestrator import events as ev
from rlm_orchestrator.convert.events import SHUTDOWN_METADATA_KEY
from rlm_orchestrator.exceptions import (
    AnswerTooLargeError,
    ClientError,
    CompletionCancelledError,
    CompletionTimeoutError,
    CostLimitExceededError,
    InvalidRequestError,
    LMError,
    ResourceExhaustedError,
    RLMError,
    SandboxError,
    ServerShutdownError,
)
from rlm_orchestrator.failures import exception_for, failure_kind, kind_from_proto, kind_to_proto
from rlm_orchestrator.service.status import maps_rlm_errors
from rlm_orchestrator.types import UsageSummary
from rlm_wire.status import Aborted, InvalidArgument, NotFound, maps_errors
from rlm_wire.v1 import orchestrator_pb2, sandbox_pb2, sandbox_pb2_grpc

TIMEOUT = 10


def _refusing(decorate: Callable[[type[Any]], type[Any]]) -> type[Any]:
    """A Sandbox servicer, mapped by `decorate`, whose RPCs raise the error it is given (after
    one message, for the streams that send)."""

    @decorate
    class Refusing(sandbox_pb2_grpc.SandboxServicer):
        def __init__(self, error: BaseException) -> None:
            self.error = error

        async def GetInfo(self, request: Any, context: Any) -> sandbox_pb2.GetInfoResponse:
            raise self.error  # unary-unary

        async def Attach(
            self, request: Any, context: Any
        ) -> AsyncIterator[sandbox_pb2.AttachEvent]:
            yield sandbox_pb2.AttachEvent(attachments=1)  # unary-stream, an async generator
            raise self.error

        async def Execute(
            self, request_iterator: Any, context: Any
        ) -> AsyncIterator[sandbox_pb2.ExecuteResponse]:
            async for _ in request_iterator:  # stream-stream, an async generator
                yield sandbox_pb2.ExecuteResponse()
                raise self.error

        async def LoadValue(self, request_iterator: Any, context: Any) -> Any:
            async for _ in request_iterator:  # stream-unary
                raise self.error

        async def GetVariable(self, request: Any, context: Any) -> None:
            await context.write(sandbox_pb2.GetVariableResponse())  # streamed by context.write
            raise self.error

    return Refusing


_AgentRefusing = _refusing(maps_errors())
_OrchestratorRefusing = _refusing(maps_rlm_errors)


async def _calls(stub: Any) -> dict[str, Awaitable[Any]]:
    async def stream_out(call: Any) -> list[Any]:
        return [message async for message in call]

    async def requests() -> AsyncIterator[Any]:
        yield sandbox_pb2.ExecuteRequest(start=sandbox_pb2.ExecuteStart(code="x"))

    async def chunks() -> AsyncIterator[Any]:
        yield sandbox_pb2.LoadValueRequest(data=b"x")

    return {
        "unary_unary": stub.GetInfo(sandbox_pb2.GetInfoRequest(), timeout=TIMEOUT),
        "unary_stream": stream_out(stub.Attach(sandbox_pb2.AttachRequest(), timeout=TIMEOUT)),
        "stream_stream": stream_out(stub.Execute(requests(), timeout=TIMEOUT)),
        "stream_unary": stub.LoadValue(chunks(), timeout=TIMEOUT),
        "written_stream": stream_out(
            stub.GetVariable(sandbox_pb2.GetVariableRequest(), timeout=TIMEOUT)
        ),
    }


async def _statuses(servicer: Any) -> dict[str, grpc.aio.AioRpcError]:
    """The error each kind of call ends with, on a bare server (no interceptor)."""
    server = grpc.aio.server()
    sandbox_pb2_grpc.add_SandboxServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    errors = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for kind, call in (await _calls(sandbox_pb2_grpc.SandboxStub(channel))).items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                errors[kind] = caught.value
    finally:
        await server.stop(None)
    return errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("the first message must be `start`"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("no lease 'x'"), grpc.StatusCode.NOT_FOUND),
        (Aborted("the worker died"), grpc.StatusCode.ABORTED),
    ],
)
async def test_the_agents_exceptions_end_every_kind_of_call_with_their_status(
    error: Exception, code: grpc.StatusCode
) -> None:
    for kind, status in (await _statuses(_AgentRefusing(error))).items():
        assert (status.code(), status.details()) == (code, str(error)), kind


async def test_other_exceptions_are_left_to_grpc_as_unknown() -> None:
    for kind, status in (await _statuses(_AgentRefusing(KeyError("a bug")))).items():
        assert status.code() == grpc.StatusCode.UNKNOWN, kind
    # The agent's mapping knows nothing of the orchestrator's exceptions, and the reverse.
    for kind, status in (await _statuses(_AgentRefusing(SandboxError("lost")))).items():
        assert status.code() == grpc.StatusCode.UNKNOWN, kind
    for kind, status in (await _statuses(_OrchestratorRefusing(NotFound("x")))).items():
        assert status.code() == grpc.StatusCode.UNKNOWN, kind


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("no session 'x'", code="NOT_FOUND"), grpc.StatusCode.NOT_FOUND),
        (InvalidRequestError("bad context"), grpc.StatusCode.INVALID_ARGUMENT),
        (ResourceExhaustedError("max_sessions=2"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LMError("rate limited", status_code=429), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LMError("bad request", status_code=400), grpc.StatusCode.INVALID_ARGUMENT),
        (LMError("timed out", status_code=408), grpc.StatusCode.UNAVAILABLE),
        (LMError("no status"), grpc.StatusCode.UNAVAILABLE),
        (SandboxError("no sandbox"), grpc.StatusCode.UNAVAILABLE),
        (ClientError("odd", code="NOT_A_STATUS"), grpc.StatusCode.UNKNOWN),
    ],
)
async def test_the_orchestrators_exceptions_end_every_kind_of_call_with_their_code(
    error: RLMError, code: grpc.StatusCode
) -> None:
    for kind, status in (await _statuses(_OrchestratorRefusing(error))).items():
        assert (status.code(), status.details()) == (code, str(error)), kind
        assert not any(k == SHUTDOWN_METADATA_KEY for k, _ in status.trailing_metadata() or ())


async def test_a_shutdown_carries_the_metadata_the_sdk_knows_it_by() -> None:
    error = ServerShutdownError("the server is shutting down")
    for kind, status in (await _statuses(_OrchestratorRefusing(error))).items():
        assert status.code() == grpc.StatusCode.UNAVAILABLE, kind
        assert (SHUTDOWN_METADATA_KEY, "1") in tuple(status.trailing_metadata() or ()), kind


def _failed(kind: str, **fields: Any) -> ev.CompletionFailed:
    return ev.CompletionFailed(kind, "it failed", "partial", UsageSummary(), 3, **fields)


def test_every_failure_kind_of_the_proto_has_a_name_and_an_exception() -> None:
    kinds = [v for v in orchestrator_pb2.FailureKind.values() if v]  # not UNSPECIFIED
    for value in kinds:
        name = kind_from_proto(value)
        assert kind_to_proto(name) == value
        raised = exception_for(_failed(name))
        assert str(raised) == "it failed"
        # What the server reports for it is what the SDK raises for it (but the server's own
        # limit on answers: refused as RESOURCE_EXHAUSTED, as documented).
        if name != "answer_too_large":
            assert failure_kind(raised) == name
    assert kind_from_proto(0) == kind_from_proto(999) == "internal"


def test_the_sdk_raises_what_rlm_raises_with_the_failures_fields() -> None:
    timeout = exception_for(_failed("timeout", limit=30.0, elapsed_seconds=31.0))
    assert isinstance(timeout, CompletionTimeoutError)
    assert (timeout.timeout_seconds, timeout.elapsed_seconds) == (30.0, 31.0)
    assert (timeout.partial_answer, timeout.iterations) == ("partial", 3)
    cost = exception_for(_failed("cost_limit", limit=1.5))
    assert isinstance(cost, CostLimitExceededError) and cost.cost_limit == 1.5
    lm = exception_for(_failed("lm_error", status_code=401))
    assert isinstance(lm, LMError) and (lm.status_code, lm.code) == (401, "INVALID_ARGUMENT")
    cancelled = exception_for(_failed("cancelled"))
    assert isinstance(cancelled, CompletionCancelledError)
    assert cancelled.partial_answer == "partial"
    shutdown = exception_for(_failed("server_shutdown", limit=5.0))
    assert isinstance(shutdown, ServerShutdownError) and shutdown.grace_seconds == 5.0
    too_large = exception_for(_failed("answer_too_large", limit=10.0))
    assert type(too_large) is ResourceExhaustedError and too_large.code == "RESOURCE_EXHAUSTED"
    assert type(exception_for(_failed("internal"))) is RLMError
    assert type(exception_for(_failed("from a newer server"))) is RLMError


def test_exceptions_carry_their_failure_kind() -> None:
    assert failure_kind(AnswerTooLargeError("too long")) == "answer_too_large"
    assert failure_kind(SandboxError("lost")) == "sandbox_error"
    assert failure_kind(ValueError("a bug")) == failure_kind(RLMError("?")) == "internal"
