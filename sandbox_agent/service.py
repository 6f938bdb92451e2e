"""The gRPC face of the agent: a thin adapter from rlm.v1.Sandbox onto the Executor.

Handlers refuse a call by raising the agent's status exceptions; `@maps_errors()` ends the
call with their status (`status.py`).
"""

from __future__ import annotations

import asyncio
import keyword
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from rlm_wire.status import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    maps_errors,
)
from rlm_wire.v1 import sandbox_pb2 as pb
from rlm_wire.v1 import sandbox_pb2_grpc
from sandbox_agent import __version__
from sandbox_agent.execute_stream import ExecuteStream
from sandbox_agent.executor import Executor, WorkerError
from sandbox_agent.lease import LeaseError, LeaseKeeper
from sandbox_agent.limits import DEFAULT_MAX_ANSWER_CHARS
from sandbox_agent.namespace import HELPER_NAMES
from sandbox_agent.orphan import OrphanWatch
from sandbox_agent.protocol import VariableHeaderFrame

_ENCODINGS = {pb.VALUE_ENCODING_TEXT: "text", pb.VALUE_ENCODING_JSON: "json"}


@maps_errors()
class SandboxService(sandbox_pb2_grpc.SandboxServicer):
    def __init__(
        self,
        executor: Executor,
        leases: LeaseKeeper | None = None,
        orphans: OrphanWatch | None = None,
    ) -> None:
        self._executor = executor
        # Attach streams held by the orchestrator; without a timeout they are only counted.
        self._orphans = orphans or OrphanWatch(0, lambda: None)
        # Fleet mode: calls must carry the active lease.
        self._leases = leases
        self._value_dir = executor.config.state_dir / "values"
        self._streams: set[ExecuteStream] = set()  # Execute calls open now

    async def Execute(  # type: ignore[override]  # writes via context.write, returns nothing
        self,
        request_iterator: AsyncIterator[pb.ExecuteRequest],
        context: grpc.aio.ServicerContext[pb.ExecuteRequest, pb.ExecuteResponse],
    ) -> None:
        self._require_lease(context)
        requests = aiter(request_iterator)
        stream = ExecuteStream(self._executor, requests, context, self._require_lease)
        self._streams.add(stream)
        try:
            await stream.serve()
        finally:
            self._streams.discard(stream)

    def end_idle_streams(self) -> None:
        """At shutdown: end the Execute streams between blocks now (OK), rather than after
        the server's grace; a running block still gets the grace to finish."""
        for stream in self._streams:
            stream.end_if_idle()

    async def LoadValue(
        self,
        request_iterator: AsyncIterator[pb.LoadValueRequest],
        context: grpc.aio.ServicerContext[pb.LoadValueRequest, pb.LoadValueResponse],
    ) -> pb.LoadValueResponse:
        self._require_lease(context)
        staged = await asyncio.to_thread(self._staging_path)
        try:
            header, received = await self._receive(request_iterator, staged)
            if header.total_bytes and received != header.total_bytes:
                raise InvalidArgument(
                    f"received {received} bytes of {header.name!r}, "
                    f"the header announced {header.total_bytes}"
                )
            target = self._value_dir / f"{header.name}.value"
            await asyncio.to_thread(staged.replace, target)
        except BaseException:
            await asyncio.to_thread(staged.unlink, missing_ok=True)
            raise
        try:
            reply = await self._executor.load_value(
                header.name, header.alias, _ENCODINGS[header.encoding], target
            )
        except WorkerError as exc:
            raise InvalidArgument(str(exc)) from exc
        return pb.LoadValueResponse(type_name=reply["type_name"], length=reply["length"])

    def _staging_path(self) -> Path:
        self._value_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self._value_dir, suffix=".partial")
        os.close(handle)
        return Path(name)

    async def _receive(
        self,
        request_iterator: AsyncIterator[pb.LoadValueRequest],
        staged: Path,
    ) -> tuple[pb.LoadValueHeader, int]:
        """Streams the chunks to disk (constant memory, whatever the size)."""
        header: pb.LoadValueHeader | None = None
        received = 0
        with await asyncio.to_thread(open, staged, "wb") as staging:
            async for chunk in request_iterator:
                if header is None:
                    header = chunk.header
                    self._check_header(header)
                await asyncio.to_thread(staging.write, chunk.data)
                received += len(chunk.data)
        if header is None:
            raise InvalidArgument("empty LoadValue stream")
        return header, received

    @staticmethod
    def _check_header(header: pb.LoadValueHeader) -> None:
        for name in (header.name, header.alias):
            if name and (
                not name.isidentifier() or keyword.iskeyword(name) or name in HELPER_NAMES
            ):
                raise InvalidArgument(f"invalid variable name {name!r}")
        if not header.name:
            raise InvalidArgument("the first chunk needs a header.name")
        if header.encoding not in _ENCODINGS:
            raise InvalidArgument("header.encoding must be TEXT or JSON")

    async def GetVariable(  # type: ignore[override]  # writes via context.write
        self,
        request: pb.GetVariableRequest,
        context: grpc.aio.ServicerContext[pb.GetVariableRequest, pb.GetVariableResponse],
    ) -> None:
        self._require_lease(context)

        async def on_header(header: VariableHeaderFrame) -> None:
            message = pb.VariableHeader(
                found=header.found,
                type_name=header.type_name,
                chars=header.chars,
                available=header.available,
            )
            await context.write(pb.GetVariableResponse(header=message))

        async def on_chunk(text: str) -> None:
            await context.write(pb.GetVariableResponse(chunk=text))

        try:
            await self._executor.read_variable(
                request.name,
                final_answer=request.final_answer,
                max_chars=request.max_chars or DEFAULT_MAX_ANSWER_CHARS,
                on_header=on_header,
                on_chunk=on_chunk,
            )
        except WorkerError as exc:
            raise Aborted(f"{exc}. A new worker was started: every variable is lost.") from exc

    def _require_lease(self, context: Any) -> None:
        if self._leases is not None:
            problem = self._leases.check(context.invocation_metadata())
            if problem is not None:
                raise FailedPrecondition(problem)

    async def Lease(self, request: pb.LeaseRequest, context: Any) -> pb.LeaseResponse:
        leases = self._fleet()
        try:
            lease = await leases.lease(request.session_id, request.holder, request.ttl_seconds)
        except LeaseError as exc:
            raise FailedPrecondition(str(exc)) from exc
        return pb.LeaseResponse(lease_id=lease.lease_id, ttl_seconds=lease.ttl)

    async def RenewLease(self, request: pb.RenewLeaseRequest, context: Any) -> pb.LeaseResponse:
        leases = self._fleet()
        try:
            lease = leases.renew(request.lease_id)
        except LeaseError as exc:
            raise NotFound(str(exc)) from exc
        return pb.LeaseResponse(lease_id=lease.lease_id, ttl_seconds=lease.ttl)

    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: Any
    ) -> pb.ReleaseLeaseResponse:
        leases = self._fleet()
        try:
            await leases.release(request.lease_id)
        except LeaseError as exc:
            raise NotFound(str(exc)) from exc
        return pb.ReleaseLeaseResponse()

    def _fleet(self) -> LeaseKeeper:
        if self._leases is None:
            raise FailedPrecondition("not a fleet agent (started without --fleet)")
        return self._leases

    async def GetInfo(
        self,
        request: pb.GetInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetInfoRequest, pb.GetInfoResponse],
    ) -> pb.GetInfoResponse:
        import platform

        return pb.GetInfoResponse(
            agent_version=__version__,
            python_version=platform.python_version(),
            agent_pid=os.getpid(),
            worker_pid=self._executor.worker_pid,
            workers_started=self._executor.workers_started,
            loaded_values=self._executor.loaded_names,
            workdir=str(self._executor.config.workdir),
            fleet=self._leases is not None,
            leased=bool(self._leases and self._leases.active),
            lease_session_id=self._leases.active.session_id
            if self._leases and self._leases.active
            else "",
            isolation=self._executor.isolation,
        )

    async def Attach(
        self,
        request: pb.AttachRequest,
        context: grpc.aio.ServicerContext[pb.AttachRequest, pb.AttachEvent],
    ) -> AsyncIterator[pb.AttachEvent]:
        attachments = self._orphans.attach()
        try:
            yield pb.AttachEvent(
                orphan_timeout_seconds=self._orphans.timeout, attachments=attachments
            )
            # Open until the orchestrator closes it or goes away (the call is cancelled).
            await asyncio.Event().wait()
        finally:
            self._orphans.detach()
