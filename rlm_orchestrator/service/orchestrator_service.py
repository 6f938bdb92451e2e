"""The Orchestrator servicer: completions and sessions for many clients at once.

Clients are tenants: a request's limits stay under the server's ceilings, and every call takes
its slots (completions, sessions, sandboxes) when it is accepted, before any upload
(`admission.py`). Each completion runs as a task of its own, on the shared router and sandbox
pool; its events wait for the client's stream in a buffer bounded by bytes (`event_buffer.py`).
Whatever ends it (its answer, a limit, the client hanging up, CancelCompletion, shutdown), its
sandbox is released and its slots given back before the RPC ends. Refusals are raised (an
RLMError with its status, `status.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator import budget
from rlm_orchestrator import events as ev
from rlm_orchestrator.exceptions import (
    InvalidRequestError,
    LMError,
    NotFoundError,
    SandboxError,
    ServerShutdownError,
    ServerUnavailableError,
)
from rlm_orchestrator.journal.recorder import CompletionJournal
from rlm_orchestrator.logger import RLMLogger
from rlm_orchestrator.router import LMRouter, UsageTracker
from rlm_orchestrator.runner import CompletionRunner
from rlm_orchestrator.sandbox import SandboxProvider
from rlm_orchestrator.sandbox.limits import SandboxPool
from rlm_orchestrator.service import durable_service
from rlm_orchestrator.service.admission import (
    Admission,
    CapacityRefused,
    RequestLimits,
    Ticket,
    loop_settings_for,
    request_limits,
)
from rlm_orchestrator.service.durable import Durability
from rlm_orchestrator.service.event_buffer import EventBuffer
from rlm_orchestrator.service.outcome import Outcome, RunningCompletion
from rlm_orchestrator.service.run_input import Context, merged_options, read_context, read_start
from rlm_orchestrator.service.settings import ServerSettings
from rlm_orchestrator.service.status import maps_rlm_errors
from rlm_orchestrator.service.tenants import Tenant, Tenants
from rlm_orchestrator.session import SessionState
from rlm_orchestrator.telemetry import metrics
from rlm_wire.v1 import orchestrator_pb2 as pb
from rlm_wire.v1 import orchestrator_pb2_grpc

log = logging.getLogger("rlm_orchestrator.service")
SHUTTING_DOWN = "the server is shutting down"
# After a shutdown's grace: how long streams get to deliver their last events before the cut.
SHUTDOWN_FLUSH_SECONDS = 2.0


@dataclass
class _Session:
    session_id: str
    state: SessionState
    options: pb.CompletionOptions
    ticket: Ticket  # its session slot and the sandbox slot its sandbox lives on
    tenant: str  # whose it is: only that tenant may use or close it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)


@maps_rlm_errors
class OrchestratorService(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(
        self,
        settings: ServerSettings,
        router: LMRouter,
        pool: SandboxPool,
        tenants: Tenants,
        durability: Durability | None = None,
    ) -> None:
        self.settings = settings
        # The journal of durable completions (durable.py), when the server keeps one.
        self.durability = durability
        self.tenants = tenants
        self.router = router
        self.pool = pool
        self.admission = Admission(settings, pool)
        self.running: dict[str, RunningCompletion] = {}
        self.sessions: dict[str, _Session] = {}
        self.accepting = True
        # Set by a shutdown: the grace its completions had, and whether streams are being cut.
        self._shutdown_grace: float | None = None
        self._cutting = False
        self._streams: set[asyncio.Task[Any]] = set()  # the Run calls' tasks
        self._logger = RLMLogger(settings.log_dir, "completion") if settings.log_dir else None

    # -- Run -----------------------------------------------------------------------------------

    async def Run(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: Context
    ) -> AsyncIterator[pb.CompletionEvent]:
        # A refusal before any header: the client sees the status with no headers, so it never
        # writes (a grpc.aio client whose write races a status may report INTERNAL instead).
        if not self.accepting:
            raise ServerShutdownError(SHUTTING_DOWN)
        # Then headers: a client that waits for them before writing (our SDK) always gets the
        # status of a later refusal (limits, capacity).
        await context.send_initial_metadata(())
        tenant = self.tenants.identify(context.invocation_metadata())
        start = await read_start(request_iterator, self.settings.max_context_bytes)
        session = self._session_for(start.session_id, tenant)
        options = merged_options(session.options if session else None, start.options)
        limits = request_limits(options, self.settings)
        router, root_model = self._router(options)
        needs_sandbox = session is None and limits.max_depth > 0
        ticket = self._admit(lambda: self.admission.completion(tenant, needs_sandbox=needs_sandbox))
        # From here the slots are ours: whatever ends the call gives them back.
        stream = asyncio.current_task()
        assert stream is not None
        self._streams.add(stream)
        try:
            slot = session.ticket.sandbox_slot if session else ticket.sandbox_slot
            runner = self._make_runner(router, limits, options, self.pool.view(slot))
            running = RunningCompletion(
                uuid.uuid4().hex,
                start.session_id,
                root_model,
                UsageTracker(limits.max_cost),
                EventBuffer(self.settings.max_buffered_event_bytes),
                tenant=tenant.name,
            )
            if self.durability is not None and session is None:
                stream_of = durable_service.durable_stream(
                    self, runner, running, start, options, request_iterator, ticket.give_back
                )
            else:
                stream_of = self._stream(runner, running, session, start, request_iterator)
            async for message in stream_of:
                yield message
        except asyncio.CancelledError:
            if self._cutting:
                raise ServerShutdownError(self._cut_message()) from None
            raise
        finally:
            if running.task is None or self.durability is None or session is not None:
                ticket.give_back()  # else the detached completion gives it back as it ends
            self._streams.discard(stream)

    async def _stream(
        self,
        runner: CompletionRunner,
        running: RunningCompletion,
        session: _Session | None,
        start: pb.CompletionStart,
        request_iterator: AsyncIterator[pb.RunRequest],
    ) -> AsyncIterator[pb.CompletionEvent]:
        """An admitted completion: `started`, the upload, then its events as it runs."""
        events = running.events
        assert isinstance(events, EventBuffer)  # a journaled one streams from its log instead
        runner.emit = emit = durable_service.emitter(running, self.settings.event_excerpt_chars)
        yield pb.CompletionEvent(
            started=pb.CompletionStarted(
                completion_id=running.completion_id, session_id=start.session_id
            )
        )
        # `started` doubles as "accepted": the client sends the context only after it, so a
        # refused request (auth, size, options, capacity) costs no upload.
        roles = (runner.router.root, runner.router.sub)
        if reason := budget.unenforceable(running.tracker.max_cost, roles):
            emit(ev.Notice(0, reason))
        value = await read_context(request_iterator, start)
        running.task = asyncio.create_task(
            self._complete(runner, running, session, value, start.root_prompt or None)
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
        running: RunningCompletion,
        session: _Session | None,
        value: Any,
        root_prompt: str | None,
        journal: CompletionJournal | None = None,
    ) -> None:
        """Runs the completion; its last event is `finished` or `failed`, then the end mark
        (and, journaled, its end in the journal)."""
        outcome = Outcome(
            running, self.settings.max_answer_chars, self.settings.event_excerpt_chars
        )
        state = "failed"
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
                    value,
                    root_prompt,
                    tracker=running.tracker,
                    root_model=running.root_model,
                    journal=journal,
                )
            await outcome.finish(result)
            state = "finished"
        except asyncio.CancelledError:
            grace = self._shutdown_grace
            if grace is None:
                state = "cancelled"
                outcome.fail(pb.FAILURE_KIND_CANCELLED, "the completion was cancelled")
            elif journal is not None:
                state = ""  # handed over: another server (or this one, back) resumes it
            else:
                message = (
                    f"{SHUTTING_DOWN}: the completion was cancelled at the end of the {grace:g} s "
                    "shutdown grace period; retry it (on another server, or on this one once it "
                    "is back)"
                )
                outcome.fail(pb.FAILURE_KIND_SERVER_SHUTDOWN, message, limit=grace)
            raise
        except Exception as exc:
            outcome.fail_with(exc)
        finally:
            running.events.close()
            if journal is not None and self.durability is not None:
                if state:
                    await self.durability.end(running.completion_id, state, {"state": state})
                else:
                    await self.durability.hand_over(running.completion_id)

    def _session_for(self, session_id: str, tenant: Tenant) -> _Session | None:
        if not session_id:
            return None
        session = self.sessions.get(session_id)
        if session is None or session.tenant != tenant.name:  # another's does not exist
            raise NotFoundError(f"no session {session_id!r}")
        return session

    def _own_completion(self, completion_id: str, context: Context) -> RunningCompletion | None:
        running = self.running.get(completion_id)
        tenant = self.tenants.identify(context.invocation_metadata())
        return running if running is not None and running.tenant == tenant.name else None

    def _router(self, options: pb.CompletionOptions) -> tuple[LMRouter, str]:
        """The router for these models, and its root model (INVALID_ARGUMENT on unknown names)."""
        try:
            router = self.router.with_roles(
                options.model if options.HasField("model") else None,
                options.sub_model if options.HasField("sub_model") else None,
            )
        except LMError as exc:
            raise InvalidRequestError(str(exc)) from exc
        return router, router.root.model_name

    @staticmethod
    def _admit(take: Callable[[], Ticket]) -> Ticket:
        try:
            return take()
        except CapacityRefused as exc:
            log.warning("refused: %s", exc)
            raise

    def _make_runner(
        self,
        router: LMRouter,
        limits: RequestLimits,
        options: pb.CompletionOptions,
        provider: SandboxProvider,
    ) -> CompletionRunner:
        loop_settings = loop_settings_for(options, limits, self.settings)
        return CompletionRunner(router, provider, loop_settings, logger=self._logger)

    async def AttachCompletion(
        self, request: pb.AttachCompletionRequest, context: Context
    ) -> AsyncIterator[pb.CompletionEvent]:
        async for message in durable_service.attach(self, request, context):
            yield message

    # -- management ----------------------------------------------------------------------------

    async def CancelCompletion(
        self, request: pb.CancelCompletionRequest, context: Context
    ) -> pb.CancelCompletionResponse:
        running = self._own_completion(request.completion_id, context)
        if running is None or running.task is None:
            raise _no_completion(request.completion_id)
        running.task.cancel()
        return pb.CancelCompletionResponse()

    async def ListCompletions(
        self, request: pb.ListCompletionsRequest, context: Context
    ) -> pb.ListCompletionsResponse:
        tenant = self.tenants.identify(context.invocation_metadata())
        own = [r.info() for r in self.running.values() if r.tenant == tenant.name]
        return pb.ListCompletionsResponse(completions=own)

    async def GetCompletion(
        self, request: pb.GetCompletionRequest, context: Context
    ) -> pb.CompletionInfo:
        running = self._own_completion(request.completion_id, context)
        if running is None:
            raise _no_completion(request.completion_id)
        return running.info()

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.SessionInfo:
        if not self.accepting:
            raise ServerShutdownError(SHUTTING_DOWN)
        limits = request_limits(request.options, self.settings)
        router, _ = self._router(request.options)
        tenant = self.tenants.identify(context.invocation_metadata())
        ticket = self._admit(lambda: self.admission.session(tenant))
        try:
            provider = self.pool.view(ticket.sandbox_slot)
            runner = self._make_runner(router, limits, request.options, provider)
            state = await runner.new_session()
        except BaseException as exc:
            ticket.give_back()
            if isinstance(exc, SandboxError):
                raise ServerUnavailableError(f"no sandbox: {exc}") from exc
            raise
        session = _Session(uuid.uuid4().hex, state, request.options, ticket, tenant.name)
        if not self.accepting:  # the shutdown began while the sandbox was starting
            await self._close(session)
            raise ServerShutdownError(SHUTTING_DOWN)
        self.sessions[session.session_id] = session
        return pb.SessionInfo(session_id=session.session_id)

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: Context
    ) -> pb.CloseSessionResponse:
        tenant = self.tenants.identify(context.invocation_metadata())
        session = self._session_for(request.session_id, tenant)
        if session is None:
            raise NotFoundError(f"no session {request.session_id!r}")
        self.sessions.pop(request.session_id, None)
        async with session.lock:  # let a running completion of the session finish first
            await self._close(session)
        return pb.CloseSessionResponse()

    async def _close(self, session: _Session) -> None:
        try:
            metrics.sandbox_released(session.state.sandbox.sandbox_id)
            await self.pool.release(session.state.sandbox)
        finally:
            session.ticket.give_back()

    # -- lifecycle -----------------------------------------------------------------------------

    async def reap_idle_sessions(self) -> None:
        """Close sessions unused for longer than the TTL (clients that forgot to close)."""
        deadline = time.monotonic() - self.settings.session_ttl_seconds
        for session in list(self.sessions.values()):
            if session.last_used < deadline and not session.lock.locked():
                self.sessions.pop(session.session_id, None)
                await self._close(session)

    async def drain(self, grace_seconds: float) -> None:
        """Shutdown: refuse new work, give running completions the grace period, end the rest
        with a SERVER_SHUTDOWN failure, let their streams deliver it, then cut what is left
        (uploads, clients not reading) with UNAVAILABLE, and close every session."""
        self.accepting = False
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_seconds)
        # Completions that started during the grace (their upload was accepted) end too.
        pending = [r.task for r in self.running.values() if r.task and not r.task.done()]
        self._shutdown_grace = grace_seconds
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=SHUTDOWN_FLUSH_SECONDS)
        self._cutting = True
        streams = set(self._streams)
        for stream in streams:
            stream.cancel()
        if streams:
            await asyncio.wait(streams, timeout=SHUTDOWN_FLUSH_SECONDS)
        for session in list(self.sessions.values()):
            self.sessions.pop(session.session_id, None)
            await self._close(session)

    def _cut_message(self) -> str:
        return (
            f"{SHUTTING_DOWN}: this call was cut after the {self._shutdown_grace or 0:g} s "
            "shutdown grace period; retry it on another server, or on this one once it is back"
        )


def _no_completion(completion_id: str) -> NotFoundError:
    """NOT_FOUND: also what another tenant's completion is to the caller."""
    return NotFoundError(f"no running completion {completion_id!r}")
