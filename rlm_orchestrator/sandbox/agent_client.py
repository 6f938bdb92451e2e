"""Typed client of one sandbox agent. The only place that touches the Sandbox stubs.

Every gRPC failure becomes a SandboxError here, with the status code and what we were doing;
callers never see a raw grpc.aio.AioRpcError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context

from rlm_orchestrator import telemetry
from rlm_orchestrator.exceptions import SandboxError
from sandbox_agent._proto.rlm.v1 import sandbox_pb2 as pb
from sandbox_agent._proto.rlm.v1 import sandbox_pb2_grpc

LOAD_CHUNK_BYTES = 1024 * 1024
LEASE_METADATA = "rlm-lease"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Executions can run for minutes without a byte; keepalive pings keep NATs and proxies
    # from dropping the stream (the agent permits one every 10 s).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Agents come up in well under a second: do not back off for seconds between attempts.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
STDOUT, STDERR = "stdout", "stderr"
_STATUS_NAMES = {
    pb.EXECUTION_STATUS_OK: "ok",
    pb.EXECUTION_STATUS_ERROR: "error",
    pb.EXECUTION_STATUS_TIMEOUT: "timeout",
    pb.EXECUTION_STATUS_WORKER_DIED: "worker_died",
    pb.EXECUTION_STATUS_CANCELLED: "cancelled",
}


@dataclass
class SubCallOutcome:
    """The answer to one prompt of a sub-LM request: text, or an error message."""

    text: str | None = None
    error: str | None = None


OutputHandler = Callable[[str, str], Awaitable[None]]
# (prompts, model or "", kind "llm_query" | "rlm_query") -> one outcome per prompt, in order.
SubCallHandler = Callable[[list[str], str, str], Awaitable[Sequence[SubCallOutcome]]]


@dataclass
class ExecutionReport:
    """An execution as the orchestrator saw it: output gathered from the stream + summary."""

    status: str
    stdout: str
    stderr: str
    error: str
    variables: list[tuple[str, str]] = field(default_factory=list)
    duration: float = 0.0
    truncated_chars: int = 0
    final_answer: str | None = None
    worker_restarted: bool = False
    # The agent's span of this execution (when traced), for the orchestrator to export.
    agent_span: pb.AgentSpan | None = None


@dataclass
class VariableValue:
    found: bool
    value: str = ""
    type_name: str = ""
    truncated: bool = False
    available: list[str] = field(default_factory=list)


def _sandbox_error(doing: str, exc: grpc.aio.AioRpcError) -> SandboxError:
    return SandboxError(f"sandbox agent failed while {doing}: {exc.code().name}: {exc.details()}")


class AgentClient:
    """One channel to one agent."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        # Dialling an address (a fleet pod's IP) whose certificate names a host: check that name.
        options: list[tuple[str, str | int]] = [*CHANNEL_OPTIONS]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._metadata = tuple(metadata)
        self.lease_id = ""
        self._calls: set[Any] = set()
        self._abort_reason: str | None = None
        self._stub = sandbox_pb2_grpc.SandboxStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._attachment: asyncio.Task[None] | None = None

    def abort(self, reason: str) -> None:
        """Fail the calls in flight with SandboxError(reason): the agent was found lost (a
        half-open connection would otherwise hang until keepalive gives up)."""
        self._abort_reason = reason
        for call in list(self._calls):
            call.cancel()

    async def close(self) -> None:
        if self._attachment is not None:
            self._attachment.cancel()
            await asyncio.gather(self._attachment, return_exceptions=True)
            self._attachment = None
        await self._channel.close()

    async def attach(self, holder: str) -> None:
        """Hold an Attach stream open until `close()`: an agent started with an orphan timeout
        stops by itself once this process is gone. Returns once the agent has registered it."""
        registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._attachment = asyncio.create_task(self._hold(holder, registered), name="attach")
        await registered

    async def _hold(self, holder: str, registered: asyncio.Future[None]) -> None:
        try:
            call = self._stub.Attach(pb.AttachRequest(holder=holder), metadata=self._metadata)
            async for _ in call:
                if not registered.done():
                    registered.set_result(None)
            raise SandboxError("the sandbox agent ended its Attach stream")
        except grpc.aio.AioRpcError as exc:
            error = _sandbox_error("attaching", exc)
            if not registered.done():
                registered.set_exception(error)
        except SandboxError as exc:
            if not registered.done():
                registered.set_exception(exc)

    async def wait_ready(self, timeout: float) -> None:
        """Poll grpc.health.v1 until SERVING; on timeout, report the last failure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_failure = "no answer"
        while loop.time() < deadline:
            try:
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(),
                    timeout=max(0.1, deadline - loop.time()),
                    wait_for_ready=True,
                    metadata=self._metadata,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                last_failure = f"health status {status_name}"
            except grpc.aio.AioRpcError as exc:
                last_failure = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.05)
        raise SandboxError(
            f"sandbox agent at {self.target} not ready after {timeout:g}s ({last_failure})"
        )

    # -- fleet leases ----------------------------------------------------------------------

    async def lease(self, session_id: str, holder: str, ttl_seconds: float) -> str:
        """Take a fleet agent for one session; later calls of this client carry the lease."""
        request = pb.LeaseRequest(session_id=session_id, holder=holder, ttl_seconds=ttl_seconds)
        try:
            reply = await self._stub.Lease(request, metadata=self._metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _sandbox_error("leasing", exc) from exc
        self.lease_id = reply.lease_id
        self._metadata = (*self._metadata, (LEASE_METADATA, reply.lease_id))
        return str(reply.lease_id)

    async def renew_lease(self, timeout: float = 10.0) -> None:
        try:
            await self._stub.RenewLease(
                pb.RenewLeaseRequest(lease_id=self.lease_id),
                metadata=self._metadata,
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise _sandbox_error("renewing its lease", exc) from exc

    async def release_lease(self) -> None:
        try:
            await self._stub.ReleaseLease(
                pb.ReleaseLeaseRequest(lease_id=self.lease_id), metadata=self._metadata, timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise _sandbox_error("releasing its lease", exc) from exc

    async def info(self) -> pb.GetInfoResponse:
        try:
            reply: pb.GetInfoResponse = await self._stub.GetInfo(
                pb.GetInfoRequest(), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _sandbox_error("describing itself", exc) from exc
        return reply

    async def load_value(self, name: str, value: Any, alias: str = "") -> pb.LoadValueResponse:
        """Bind `value` to `name` in the namespace: a str as text, anything else as JSON."""
        if isinstance(value, str):
            encoding, data = pb.VALUE_ENCODING_TEXT, value.encode("utf-8")
        else:
            encoding, data = pb.VALUE_ENCODING_JSON, json.dumps(value, default=str).encode("utf-8")

        async def chunks() -> AsyncIterator[pb.LoadValueRequest]:
            header = pb.LoadValueHeader(
                name=name, alias=alias, encoding=encoding, total_bytes=len(data)
            )
            yield pb.LoadValueRequest(header=header, data=data[:LOAD_CHUNK_BYTES])
            for offset in range(LOAD_CHUNK_BYTES, len(data), LOAD_CHUNK_BYTES):
                yield pb.LoadValueRequest(data=data[offset : offset + LOAD_CHUNK_BYTES])

        try:
            reply: pb.LoadValueResponse = await self._stub.LoadValue(
                chunks(), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _sandbox_error(f"loading {name!r}", exc) from exc
        return reply

    async def get_variable(self, name: str, max_chars: int = 0) -> VariableValue:
        try:
            reply = await self._stub.GetVariable(
                pb.GetVariableRequest(name=name, max_chars=max_chars), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _sandbox_error(f"reading variable {name!r}", exc) from exc
        return VariableValue(
            reply.found, reply.value, reply.type_name, reply.truncated, list(reply.available)
        )

    async def execute(
        self,
        code: str,
        *,
        on_output: OutputHandler,
        on_sub_call: SubCallHandler,
        timeout_seconds: float = 0,
        max_output_chars: int = 0,
        execution_id: str = "",
        traceparent: str = "",
    ) -> ExecutionReport:
        """Run one block. Output and sub-calls are handled as they arrive on the stream.

        Cancelling the awaiting task cancels the call, which makes the agent stop the code.
        """
        outgoing: asyncio.Queue[pb.ExecuteRequest | None] = asyncio.Queue()
        start = pb.ExecuteStart(
            code=code,
            timeout_seconds=timeout_seconds,
            max_output_chars=max_output_chars,
            execution_id=execution_id,
            traceparent=traceparent,
        )
        outgoing.put_nowait(pb.ExecuteRequest(start=start))

        async def requests() -> AsyncIterator[pb.ExecuteRequest]:
            while (message := await outgoing.get()) is not None:
                yield message

        async def answer(request: pb.LlmRequest) -> None:
            kind = "rlm_query" if request.kind == pb.LLM_REQUEST_KIND_RLM_QUERY else "llm_query"
            # Sub-call spans are children of the agent's execution span (this task only).
            parent = telemetry.context_from(request.traceparent)
            token = otel_context.attach(parent) if parent is not None else None
            try:
                outcomes = await on_sub_call(list(request.prompts), request.model, kind)
            finally:
                if token is not None:
                    otel_context.detach(token)
            results = [
                pb.LlmResult(error=o.error)
                if o.error is not None
                else pb.LlmResult(text=o.text or "")
                for o in outcomes
            ]
            outgoing.put_nowait(
                pb.ExecuteRequest(
                    llm_response=pb.LlmResponse(request_id=request.request_id, results=results)
                )
            )

        stdout: list[str] = []
        stderr: list[str] = []
        sub_calls: set[asyncio.Task[None]] = set()
        # The trace context rides the call's metadata too, for gRPC-level tooling.
        metadata = (
            (*self._metadata, ("traceparent", traceparent)) if traceparent else self._metadata
        )
        call = self._stub.Execute(requests(), metadata=metadata)
        self._calls.add(call)
        result: pb.ExecuteResult | None = None
        try:
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "output":
                    stream = STDOUT if message.output.stream == pb.OUTPUT_STREAM_STDOUT else STDERR
                    (stdout if stream == STDOUT else stderr).append(message.output.text)
                    await on_output(stream, message.output.text)
                elif kind == "llm_request":
                    task = asyncio.create_task(answer(message.llm_request))
                    sub_calls.add(task)
                    task.add_done_callback(sub_calls.discard)
                elif kind == "result":
                    result = message.result
                    break
        except grpc.aio.AioRpcError as exc:
            raise _sandbox_error("executing code", exc) from exc
        except asyncio.CancelledError:
            if self._abort_reason is None:
                raise
            raise SandboxError(f"the sandbox agent was lost: {self._abort_reason}") from None
        finally:
            self._calls.discard(call)
            outgoing.put_nowait(None)
            for task in sub_calls:
                task.cancel()
            if result is None:
                call.cancel()
            for task in list(sub_calls):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if result is None:
            raise SandboxError("the sandbox agent closed the execution stream without a result")
        return ExecutionReport(
            status=_STATUS_NAMES.get(result.status, "error"),
            stdout="".join(stdout),
            stderr="".join(stderr),
            error=result.error,
            variables=[(v.name, v.type_name) for v in result.variables],
            duration=result.duration_seconds,
            truncated_chars=result.truncated_chars,
            final_answer=result.final_answer if result.HasField("final_answer") else None,
            worker_restarted=result.worker_restarted,
            agent_span=result.span if result.HasField("span") else None,
        )
