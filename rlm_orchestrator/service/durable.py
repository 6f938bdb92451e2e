"""Durable completions on the server: each one journaled as it runs, its events numbered and
written before any client sees them, its lease renewed; completions a dead server left behind
taken over and resumed; clients attached to any completion by id and event offset.

A journaled completion is not tied to the stream that started it: when that stream is cut, the
completion goes on (its client re-attaches with AttachCompletion); CancelCompletion stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf import json_format

from rlm_orchestrator.config.journal import JournalSettings
from rlm_orchestrator.exceptions import ServerShutdownError
from rlm_orchestrator.journal.recorder import CompletionJournal, context_of
from rlm_orchestrator.journal.store import CompletionRecord, Event, JournalStore
from rlm_wire.v1 import orchestrator_pb2 as pb

log = logging.getLogger("rlm_orchestrator.service")
# How often a follower of a completion run elsewhere looks for new events.
POLL_SECONDS = 0.2
EVENT_PAGE = 500
# How often a long-running server applies the journal's retention (also once at its start).
PRUNE_SECONDS = 600.0


class EventLog:
    """One completion's events: numbered, then written to the store in batches, and only then
    visible to followers. Until `start` (the completion's record exists), they wait."""

    def __init__(self, store: JournalStore, completion_id: str, last_offset: int = 0) -> None:
        self.store = store
        self.completion_id = completion_id
        self._next = last_offset
        self.durable = last_offset
        self._pending: list[pb.CompletionEvent] = []
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closed = False
        self.ended = False
        # Shut down before it ended: its followers re-attach elsewhere.
        self.handed_over = False
        self._task: asyncio.Task[None] | None = None

    def put(self, message: pb.CompletionEvent) -> None:
        self._next += 1
        message.offset = self._next
        self._pending.append(message)
        self._wake.set()

    async def put_waiting(self, message: pb.CompletionEvent) -> None:
        self.put(message)

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush())

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def closed(self) -> None:
        """Every event written (or the log given up)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    async def _flush(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._pending = self._pending, []
                if batch:
                    events = [Event(m.offset, m.SerializeToString()) for m in batch]
                    await self.store.append_events(self.completion_id, events)
                    self.durable = batch[-1].offset
                    self._notify()
                if self._closed and not self._pending:
                    return
        except Exception:
            log.exception("completion %s: its events could not be journaled", self.completion_id)
        finally:
            self.ended = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


async def follow(
    store: JournalStore, completion_id: str, after: int, local: EventLog | None
) -> AsyncIterator[pb.CompletionEvent]:
    """The completion's events after `after`, then the new ones until it ends: from the store,
    woken by the log when this server runs it, else polling it."""
    while True:
        changed = asyncio.ensure_future(local.changed()) if local is not None else None
        try:
            page = await store.events(completion_id, after, EVENT_PAGE)
            for event in page:
                after = event.offset
                yield pb.CompletionEvent.FromString(event.data)
            if page:
                continue
            if local is not None:
                if local.ended and after >= local.durable:
                    if local.handed_over:
                        raise ServerShutdownError(
                            f"the server is shutting down with completion {completion_id} "
                            f"unfinished: it goes on elsewhere; re-attach after event {after}"
                        )
                    return
                assert changed is not None
                await changed
            else:
                record = await store.get(completion_id)
                if record is None or record.state != "running":
                    if not await store.events(completion_id, after, 1):
                        return
                    continue
                await asyncio.sleep(POLL_SECONDS)
        finally:
            if changed is not None:
                changed.cancel()


async def last_offset(store: JournalStore, completion_id: str) -> int:
    offset = 0
    while page := await store.events(completion_id, offset, EVENT_PAGE * 4):
        offset = page[-1].offset
    return offset


def request_of(
    start: pb.CompletionStart, options: pb.CompletionOptions, blob: str
) -> dict[str, Any]:
    """What another server needs to run the completion again (the context by its blob)."""
    return {
        "root_prompt": start.root_prompt,
        "options": json_format.MessageToDict(options),
        "context_blob": blob,
        "context_encoding": "json"
        if start.context_encoding == pb.CONTEXT_ENCODING_JSON
        else "text",
    }


def options_of(request: dict[str, Any]) -> pb.CompletionOptions:
    return json_format.ParseDict(request.get("options", {}), pb.CompletionOptions())


Resume = Callable[[CompletionRecord, CompletionJournal, EventLog, Any], Awaitable[None]]


class Durability:
    """The server's journal: its store, its owner id, the leases it holds, and the loop that
    takes over what dead servers left."""

    def __init__(self, settings: JournalSettings, store: JournalStore) -> None:
        self.settings = settings
        self.store = store
        self.owner = f"server-{uuid.uuid4().hex[:12]}"
        self.logs: dict[str, EventLog] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def begin(
        self,
        completion_id: str,
        tenant: str,
        start: pb.CompletionStart,
        options: pb.CompletionOptions,
        context_bytes: bytes,
    ) -> CompletionJournal:
        blob = await self.store.put_blob(completion_id, context_bytes)
        record = CompletionRecord(
            completion_id,
            request_of(start, options, blob),
            tenant=tenant,
            owner=self.owner,
            lease_until=time.time() + self.settings.lease_seconds,
        )
        await self.store.begin(record)
        return CompletionJournal(self.store, completion_id)

    def event_log(self, completion_id: str, last: int = 0) -> EventLog:
        log_ = EventLog(self.store, completion_id, last)
        self.logs[completion_id] = log_
        return log_

    async def hand_over(self, completion_id: str) -> None:
        """Shutting down with it unfinished: its events written, its lease given up at once, so
        that another server (or this one, started again) resumes it; its followers' streams end
        with UNAVAILABLE (they re-attach)."""
        event_log = self.logs.pop(completion_id, None)
        if event_log is not None:
            event_log.handed_over = True
            event_log.close()
            await event_log.closed()
        try:
            await self.store.renew(self.owner, [completion_id], -1.0)
        except Exception:
            log.exception("completion %s: its lease could not be given up", completion_id)

    async def end(self, completion_id: str, state: str, result: dict[str, Any]) -> None:
        """After its last event: the events written, then the record ended."""
        event_log = self.logs.pop(completion_id, None)
        if event_log is not None:
            event_log.close()
            await event_log.closed()
        try:
            await self.store.end(completion_id, state, result)  # type: ignore[arg-type]
        except Exception:
            log.exception("completion %s: its end could not be journaled", completion_id)

    def run_in_background(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def keep_leases(self, resume: Resume) -> None:
        """Forever: renew what this server runs, and take over what dead servers left."""
        period = self.settings.lease_seconds / 3
        pruned = time.monotonic()
        while True:
            try:
                if self.logs:
                    await self.store.renew(self.owner, list(self.logs), self.settings.lease_seconds)
                for record in await self.store.claim(self.owner, self.settings.lease_seconds):
                    await self._take_over(record, resume)
                if time.monotonic() - pruned > PRUNE_SECONDS:
                    pruned = time.monotonic()
                    await self.store.prune(
                        max_age_seconds=self.settings.max_age_seconds,
                        max_bytes=self.settings.max_bytes,
                    )
            except Exception:
                log.exception("journal: leases could not be renewed or claimed, or pruning failed")
            await asyncio.sleep(period)

    async def _take_over(self, record: CompletionRecord, resume: Resume) -> None:
        completion_id = record.completion_id
        entries = await self.store.entries(completion_id)
        journal = CompletionJournal(self.store, completion_id, entries)
        event_log = self.event_log(completion_id, await last_offset(self.store, completion_id))
        event_log.start()
        context = context_of(record.request, await self.store.blob(record.request["context_blob"]))
        log.info("resuming completion %s (%d journal entries)", completion_id, len(entries))
        self.run_in_background(resume(record, journal, event_log, context))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self.store.close()
