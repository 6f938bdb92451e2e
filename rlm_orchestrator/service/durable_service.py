"""The orchestrator service's durable side (OrchestratorService calls these): a journaled
completion's Run stream, its resumption by another server, and AttachCompletion.

A journaled completion runs detached from its stream: the stream follows the completion's
event log (written to the store first, so every event has its number and none is dropped), and
ending the stream does not stop the completion. Completions in sessions are not journaled
(their sandbox holds earlier completions' state).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from rlm_orchestrator import budget
from rlm_orchestrator import events as ev
from rlm_orchestrator.convert.events import event_to_proto, output_pieces
from rlm_orchestrator.exceptions import InvalidRequestError, NotFoundError, RLMError
from rlm_orchestrator.failures import failure_kind, kind_to_proto
from rlm_orchestrator.journal.recorder import CompletionJournal
from rlm_orchestrator.journal.store import CompletionRecord
from rlm_orchestrator.router import UsageTracker
from rlm_orchestrator.runner import CompletionRunner
from rlm_orchestrator.service.admission import request_limits
from rlm_orchestrator.service.durable import EventLog, follow, options_of
from rlm_orchestrator.service.outcome import RunningCompletion
from rlm_orchestrator.service.run_input import Context, read_context
from rlm_wire.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from rlm_orchestrator.service.orchestrator_service import OrchestratorService


def _context_bytes(value: Any) -> bytes:
    return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")


def emitter(running: RunningCompletion, excerpt_chars: int) -> ev.EventHandler:
    """The loop's events as wire events on the completion's log (or buffer)."""

    def emit(event: ev.Event) -> None:
        if isinstance(event, ev.TurnStarted) and event.depth == 0:
            running.iterations = event.iteration
        for piece in output_pieces(event, excerpt_chars):
            message = event_to_proto(piece, excerpt_chars)
            if message is not None:
                running.events.put(message)

    return emit


async def durable_stream(
    service: OrchestratorService,
    runner: CompletionRunner,
    running: RunningCompletion,
    start: pb.CompletionStart,
    options: pb.CompletionOptions,
    request_iterator: AsyncIterator[pb.RunRequest],
    give_back: Any,
) -> AsyncIterator[pb.CompletionEvent]:
    """Run's stream of a journaled completion; the completion outlives it."""
    durability = service.durability
    assert durability is not None
    event_log = durability.event_log(running.completion_id)
    running.events = event_log
    runner.emit = emitter(running, service.settings.event_excerpt_chars)
    started = pb.CompletionEvent(started=pb.CompletionStarted(completion_id=running.completion_id))
    event_log.put(started)
    yield started
    roles = (runner.router.root, runner.router.sub)
    if reason := budget.unenforceable(running.tracker.max_cost, roles):
        runner.emit(ev.Notice(0, reason))
    try:
        value = await read_context(request_iterator, start)
        journal = await durability.begin(
            running.completion_id, running.tenant, start, options, _context_bytes(value)
        )
    except BaseException:
        durability.logs.pop(running.completion_id, None)  # it never began: nothing to keep
        raise
    event_log.start()
    launch(service, runner, running, value, start.root_prompt or None, journal, give_back)
    async for message in follow(durability.store, running.completion_id, 1, event_log):
        yield message


def launch(
    service: OrchestratorService,
    runner: CompletionRunner,
    running: RunningCompletion,
    value: Any,
    root_prompt: str | None,
    journal: CompletionJournal,
    give_back: Any,
) -> None:
    async def run() -> None:
        try:
            await service._complete(runner, running, None, value, root_prompt, journal)
        finally:
            service.running.pop(running.completion_id, None)
            give_back()

    running.task = asyncio.create_task(run())
    service.running[running.completion_id] = running


async def resume(
    service: OrchestratorService,
    record: CompletionRecord,
    journal: CompletionJournal,
    event_log: EventLog,
    value: Any,
) -> None:
    """A completion a dead server left: run again from the start with the journal as its
    source (recorded answers, no model called twice), events numbered on from the last. One
    this server cannot run (a model it does not serve, options past its ceilings) fails, with
    a `failed` event, rather than stay claimed forever."""
    try:
        options = options_of(record.request)
        limits = request_limits(options, service.settings)
        router, root_model = service._router(options)
    except RLMError as exc:
        failed = pb.CompletionFailed(
            kind=kind_to_proto(failure_kind(exc)),
            message=f"{type(exc).__name__}: this server cannot resume it: {exc}",
        )
        event_log.put(pb.CompletionEvent(failed=failed))
        assert service.durability is not None
        await service.durability.end(record.completion_id, "failed", {"state": "failed"})
        return
    # A sandbox slot of its own when one is free (a resumed run is refused nothing: it
    # was admitted by the server that died).
    slot = service.pool.reserve() if limits.max_depth > 0 else None
    runner = service._make_runner(router, limits, options, service.pool.view(slot))
    running = RunningCompletion(
        record.completion_id,
        "",
        root_model,
        UsageTracker(limits.max_cost),
        event_log,  # type: ignore[arg-type]
        tenant=record.tenant,
    )
    runner.emit = emitter(running, service.settings.event_excerpt_chars)
    root_prompt = record.request.get("root_prompt") or None

    def give_back() -> None:
        if slot is not None:
            service.pool.close(slot)

    launch(service, runner, running, value, root_prompt, journal, give_back)


async def attach(
    service: OrchestratorService, request: pb.AttachCompletionRequest, context: Context
) -> AsyncIterator[pb.CompletionEvent]:
    if service.durability is None:
        raise InvalidRequestError(
            "this server keeps no journal: there is nothing to attach to",
            code="FAILED_PRECONDITION",
        )
    tenant = service.tenants.identify(context.invocation_metadata())
    store = service.durability.store
    record = await store.get(request.completion_id)
    if record is None or record.tenant != tenant.name:
        raise NotFoundError(f"no completion {request.completion_id!r}")
    local = service.durability.logs.get(request.completion_id)
    async for message in follow(store, request.completion_id, request.after_event, local):
        yield message


def new_completion_id() -> str:
    return uuid.uuid4().hex
