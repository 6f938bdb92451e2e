"""Typed client of one sandbox agent. The only place that touches the Sandbox stubs.

Every gRPC failure becomes a SandboxError here, at one place (`_call`, which every call goes
through), with the status code and what we were doing; callers never see a raw
grpc.aio.AioRpcError.

The agent is not trusted either (in Docker, user code runs as the agent's own uid): what it
sends is bounded again here (`sandbox_agent.limits`): output kept per stream, sub-calls in
flight, the result's fields, the size of any one message; an agent that floods is given up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.execute_call import ExecuteCall
from rlm_orchestrator.sandbox.execution_stream import (
    ExecutionReport,
    ExecutionStream,
    OutputHandler,
    SubCallHandler,
)
from rlm_wire.v1 import sandbox_pb2 as pb
from rlm_wire.v1 import sandbox_pb2_grpc
from sandbox_agent.limits import (
    DEFAULT_MAX_ANSWER_CHARS,
    MAX_FRAME_BYTES,
    MAX_NAME_CHARS,
    MAX_VARIABLES,
    MIB,
)

__all__ = ["AgentClient", "ExecutionReport", "VariableValue"]
LOAD_CHUNK_BYTES = 1024 * 1024
LEASE_METADATA = "rlm-lease"
# What we send: contexts go in 1 MiB chunks, but one LlmResponse carries the answers to a
# whole request (up to 1,000 prompts).
MAX_SEND_MESSAGE_BYTES = 64 * MIB
# What we accept in one message: the largest an honest agent sends is an LlmRequest built from
# one worker frame (MAX_FRAME_BYTES of JSON, which is never smaller than its protobuf form)
# plus its envelope. Output comes in 64 Ki-character chunks, values in 256 Ki-character ones.
# gRPC holds one message whole before handing it over: this is also what one call can make us
# hold at once.
MAX_RECEIVE_MESSAGE_BYTES = MAX_FRAME_BYTES + 1 * MIB
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
    # Executions can run for minutes without a byte; keepalive pings keep NATs and proxies
    # from dropping the stream (the agent permits one every 10 s).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Agents come up in well under a second: do not back off for seconds between attempts.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Not a backoff: grpc core gives each connection attempt this long to finish its handshake
    # (its MIN_CONNECT_TIMEOUT). At 50 ms, attempts failed whenever a loaded machine made an
    # agent answer late: 64 pooled agents woken at once, a TLS handshake to a fleet container.
    ("grpc.min_reconnect_backoff_ms", 5000),
]


@dataclass
class VariableValue:
    """str() of a variable. When it is longer than the caller's limit, `value` is empty and
    `too_large` is set: never a silent cut."""

    found: bool
    value: str = ""
    type_name: str = ""
    chars: int = 0
    available: list[str] = field(default_factory=list)
    too_large: bool = False


class _CallFailed(SandboxError):
    """A call to the agent ended with a status other than OK: `status` says which, and why."""

    def __init__(self, doing: str, status: str) -> None:
        super().__init__(f"sandbox agent failed while {doing}: {status}")
        self.status = status


def _broken(doing: str, what: str) -> SandboxError:
    return SandboxError(f"the sandbox agent broke its protocol while {doing}: {what}")


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
        self._aborted: set[Any] = set()  # the calls `abort` cancelled
        self._abort_reason = ""
        self._stub = sandbox_pb2_grpc.SandboxStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._attachment: asyncio.Task[None] | None = None
        # The Execute call kept open between blocks.
        self._execution: ExecuteCall | None = None

    def abort(self, reason: str) -> None:
        """Fail the calls in flight with SandboxError(reason): the agent was found lost (a
        half-open connection would otherwise hang until keepalive gives up)."""
        self._abort_reason = reason
        if self._execution is not None:
            self._drop(self._execution)  # idle or not: the agent is not to be trusted with it
        for call in list(self._calls):
            self._aborted.add(call)
            call.cancel()

    @contextlib.contextmanager
    def _call(self, call: Any, doing: str) -> Iterator[None]:
        """A call in flight, unary or streaming (awaited or read inside the block): `abort` can
        fail it, and its errors become SandboxError saying what we were doing. Cancelling the
        task that waits on it stays a cancellation."""
        self._calls.add(call)
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise _CallFailed(doing, f"{exc.code().name}: {exc.details()}") from exc
        except asyncio.CancelledError:
            if call not in self._aborted:
                raise
            raise SandboxError(f"the sandbox agent was lost: {self._abort_reason}") from None
        finally:
            self._calls.discard(call)
            self._aborted.discard(call)

    async def close(self) -> None:
        if self._execution is not None:
            self._drop(self._execution)
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
            with self._call(call, "attaching"):
                async for _ in call:
                    if not registered.done():
                        registered.set_result(None)
            raise SandboxError("the sandbox agent ended its Attach stream")
        except SandboxError as exc:
            if not registered.done():
                registered.set_exception(exc)

    async def wait_ready(self, timeout: float) -> None:
        """Poll grpc.health.v1 until SERVING; on timeout, report the last failure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_failure = "no answer"
        while loop.time() < deadline:
            call = self._health.Check(
                health_pb2.HealthCheckRequest(),
                timeout=max(0.1, deadline - loop.time()),
                wait_for_ready=True,
                metadata=self._metadata,
            )
            try:
                with self._call(call, "checking its health"):
                    reply = await call
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                last_failure = f"health status {status_name}"
            except _CallFailed as exc:
                last_failure = exc.status
            await asyncio.sleep(0.05)
        raise SandboxError(
            f"sandbox agent at {self.target} not ready after {timeout:g}s ({last_failure})"
        )

    # -- fleet leases ----------------------------------------------------------------------

    async def lease(self, session_id: str, holder: str, ttl_seconds: float) -> str:
        """Take a fleet agent for one session; later calls of this client carry the lease."""
        request = pb.LeaseRequest(session_id=session_id, holder=holder, ttl_seconds=ttl_seconds)
        call = self._stub.Lease(request, metadata=self._metadata, timeout=10)
        with self._call(call, "leasing"):
            reply = await call
        self.lease_id = reply.lease_id
        self._metadata = (*self._metadata, (LEASE_METADATA, reply.lease_id))
        return str(reply.lease_id)

    async def renew_lease(self, timeout: float = 10.0) -> None:
        request = pb.RenewLeaseRequest(lease_id=self.lease_id)
        call = self._stub.RenewLease(request, metadata=self._metadata, timeout=timeout)
        with self._call(call, "renewing its lease"):
            await call

    async def release_lease(self) -> None:
        request = pb.ReleaseLeaseRequest(lease_id=self.lease_id)
        call = self._stub.ReleaseLease(request, metadata=self._metadata, timeout=30)
        with self._call(call, "releasing its lease"):
            await call

    async def info(self) -> pb.GetInfoResponse:
        call = self._stub.GetInfo(pb.GetInfoRequest(), metadata=self._metadata)
        with self._call(call, "describing itself"):
            reply: pb.GetInfoResponse = await call
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

        call = self._stub.LoadValue(chunks(), metadata=self._metadata)
        with self._call(call, f"loading {name!r}"):
            reply: pb.LoadValueResponse = await call
        return reply

    async def get_variable(
        self,
        name: str = "",
        *,
        final_answer: bool = False,
        max_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    ) -> VariableValue:
        """str() of a variable (or, with final_answer, of what FINAL_VAR gave in the last
        execution), streamed in chunks; not sent when longer than max_chars."""
        doing = "reading the FINAL_VAR answer" if final_answer else f"reading variable {name!r}"
        request = pb.GetVariableRequest(name=name, max_chars=max_chars, final_answer=final_answer)
        call = self._stub.GetVariable(request, metadata=self._metadata)
        header: pb.VariableHeader | None = None
        parts: list[str] = []
        received = expected = 0
        with self._call(call, doing):
            async for message in call:
                if header is None:
                    if message.WhichOneof("kind") != "header":
                        raise _broken(doing, "the stream did not start with a header")
                    header = message.header
                    expected = header.chars if header.found and header.chars <= max_chars else 0
                    continue
                received += len(message.chunk)
                if message.WhichOneof("kind") != "chunk" or received > expected:
                    raise _broken(doing, f"it sent more than the {expected} characters due")
                parts.append(message.chunk)
        if header is None:
            raise _broken(doing, "the stream ended without a header")
        available = [n[:MAX_NAME_CHARS] for n in header.available[:MAX_VARIABLES]]
        if not header.found:
            return VariableValue(False, available=available)
        too_large = header.chars > max_chars
        if not too_large and received != header.chars:
            raise _broken(doing, f"it sent {received} of the {header.chars} characters announced")
        return VariableValue(
            True,
            "".join(parts),
            header.type_name[:MAX_NAME_CHARS],
            header.chars,
            available,
            too_large,
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

        Blocks share one Execute call (`execute_call.py`). Cancelling the awaiting task cancels
        the call, which makes the agent stop the code.
        """
        start = pb.ExecuteRequest(
            start=pb.ExecuteStart(
                code=code,
                timeout_seconds=timeout_seconds,
                max_output_chars=max_output_chars,
                execution_id=execution_id,
                traceparent=traceparent,
            )
        )
        handlers = (max_output_chars, on_output, on_sub_call)
        shared = self._execution
        if traceparent or (shared is not None and shared.busy):
            # A call of its own: a traced block's metadata names its trace too (gRPC-level
            # tooling reads context when a call opens); a second block at once is the agent's
            # to refuse, without touching the running one.
            metadata = (*self._metadata, ("traceparent", traceparent)) if traceparent else ()
            own = ExecuteCall(self._stub.Execute(metadata=metadata or self._metadata))
            try:
                return await self._run_block(own, start, handlers)
            finally:
                self._drop(own, half_close=True)
        link = self._execution
        if link is None or not link.usable:
            link = self._execution = ExecuteCall(self._stub.Execute(metadata=self._metadata))
        report = await self._run_block(link, start, handlers)
        if not link.reusable:  # an agent that ends the stream after a result
            self._drop(link, half_close=True)
        return report

    async def _run_block(
        self,
        link: ExecuteCall,
        start: pb.ExecuteRequest,
        handlers: tuple[int, OutputHandler, SubCallHandler],
    ) -> ExecutionReport:
        stream = ExecutionStream(*handlers, link.send)
        result: pb.ExecuteResult | None = None
        link.busy = True
        try:
            with self._call(link.call, "executing code"):
                await link.start(start)
                while (message := await link.read()) is not None:
                    if (result := await stream.receive(message)) is not None:
                        link.reusable = result.stream_open
                        break
        finally:
            link.busy = False
            if result is None:
                self._drop(link)
            await stream.close()
        if result is None:
            raise SandboxError("the sandbox agent closed the execution stream without a result")
        return await stream.report(result)

    def _drop(self, link: ExecuteCall, half_close: bool = False) -> None:
        """Stop using `link`: cancelled (which interrupts a running block), or half-closed
        once its block is over (the agent then ends the stream)."""
        if half_close:
            link.half_close()
        else:
            link.cancel()
        if self._execution is link:
            self._execution = None
