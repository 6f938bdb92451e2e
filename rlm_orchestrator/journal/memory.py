"""A journal store in this process's memory: the whole store interface (store.py), kept nowhere.

For tests and tools (`replay`'s tests build completions in it), and for an orchestrator that
wants the journal's bookkeeping without durability: whatever it holds is gone with the process.
It follows the contract of the durable stores, refusals included (a seq out of order, an
append to an ended completion, an id begun twice), so that code tested against it behaves the
same on SQLite or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import builtins
import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlm_orchestrator.journal.store import (
    ENDED_STATES,
    CompletionRecord,
    Entry,
    Event,
    JournalStore,
    State,
)


@dataclass
class _Completion:
    record: CompletionRecord
    entries: list[Entry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _run_of(numbers: Sequence[int], last: int, what: str, completion_id: str) -> None:
    """New numbers continue `last` one by one, or the write is refused (two writers, a gap)."""
    expected = list(range(last + 1, last + 1 + len(numbers)))
    if list(numbers) != expected:
        raise ValueError(
            f"{what} {list(numbers)[:3]} of completion {completion_id} do not follow {last}: "
            "another writer, or a gap"
        )


class MemoryJournalStore:
    """Every method runs to completion without awaiting in between: atomic on one event loop
    (a lock nonetheless, so that a future await inside one cannot break that)."""

    def __init__(self) -> None:
        self._completions: dict[str, _Completion] = {}
        self._blobs: dict[str, bytes] = {}
        # digest -> the completions that put it (one reference each): freed with the last.
        self._refs: dict[str, set[str]] = {}
        self._lock = asyncio.Lock()
        self.opened = False

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.opened = False

    async def __aenter__(self) -> MemoryJournalStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- blobs -------------------------------------------------------------------------------

    async def put_blob(self, completion_id: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        async with self._lock:
            self._blobs.setdefault(digest, bytes(data))
            self._refs.setdefault(digest, set()).add(completion_id)
        return digest

    async def blob(self, digest: str) -> bytes:
        try:
            return self._blobs[digest]
        except KeyError:
            raise KeyError(digest) from None

    def _release_blobs(self, completion_id: str) -> None:
        for digest, holders in builtins.list(self._refs.items()):
            holders.discard(completion_id)
            if not holders:
                del self._refs[digest]
                self._blobs.pop(digest, None)

    # -- completions -------------------------------------------------------------------------

    def _held(self, completion_id: str) -> _Completion:
        try:
            return self._completions[completion_id]
        except KeyError:
            raise KeyError(completion_id) from None

    async def begin(self, record: CompletionRecord) -> None:
        async with self._lock:
            if record.completion_id in self._completions:
                raise ValueError(f"completion {record.completion_id} is already there")
            now = time.time()
            kept = copy.deepcopy(record)
            kept.created_at = kept.updated_at = now
            kept.size_bytes = _size(kept.request) + _size(kept.extra)
            self._completions[record.completion_id] = _Completion(kept)

    def _writable(self, completion_id: str) -> _Completion:
        held = self._held(completion_id)
        if held.record.state != "running":
            raise ValueError(f"completion {completion_id} has ended ({held.record.state})")
        return held

    async def append(self, completion_id: str, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        async with self._lock:
            held = self._writable(completion_id)
            last = held.entries[-1].seq if held.entries else 0
            _run_of([e.seq for e in entries], last, "entries", completion_id)
            copies = [Entry(e.seq, e.kind, copy.deepcopy(e.payload)) for e in entries]
            held.entries.extend(copies)
            held.record.size_bytes += sum(len(e.kind) + _size(e.payload) for e in copies)
            held.record.updated_at = time.time()

    async def append_events(self, completion_id: str, events: Sequence[Event]) -> None:
        if not events:
            return
        async with self._lock:
            held = self._writable(completion_id)
            last = held.events[-1].offset if held.events else 0
            _run_of([e.offset for e in events], last, "events", completion_id)
            held.events.extend(Event(e.offset, bytes(e.data)) for e in events)
            held.record.size_bytes += sum(len(e.data) for e in events)
            held.record.updated_at = time.time()

    async def entries(self, completion_id: str) -> builtins.list[Entry]:
        held = self._completions.get(completion_id)
        if held is None:
            return []
        return [Entry(e.seq, e.kind, copy.deepcopy(e.payload)) for e in held.entries]

    async def events(
        self, completion_id: str, after: int = 0, limit: int = 1000
    ) -> builtins.list[Event]:
        held = self._completions.get(completion_id)
        if held is None:
            return []
        return [e for e in held.events if e.offset > after][:limit]

    async def get(self, completion_id: str) -> CompletionRecord | None:
        held = self._completions.get(completion_id)
        return None if held is None else copy.deepcopy(held.record)

    async def find(
        self, *, state: State | None = None, tenant: str | None = None, limit: int = 100
    ) -> builtins.list[CompletionRecord]:
        found = [
            held.record
            for held in self._completions.values()
            if (state is None or held.record.state == state)
            and (tenant is None or held.record.tenant == tenant)
        ]
        found.sort(key=lambda r: (-r.created_at, r.completion_id))
        return [copy.deepcopy(r) for r in found[:limit]]

    async def end(self, completion_id: str, state: State, result: dict[str, Any]) -> None:
        if state not in ENDED_STATES:
            raise ValueError(f"{state!r} is no ended state (one of {', '.join(ENDED_STATES)})")
        async with self._lock:
            record = self._held(completion_id).record
            before = _size(record.result) if record.result is not None else 0
            record.state, record.owner, record.lease_until = state, "", 0.0
            record.result = copy.deepcopy(result)
            record.size_bytes += _size(result) - before
            record.updated_at = time.time()

    # -- ownership ---------------------------------------------------------------------------

    async def claim(
        self, owner: str, lease_seconds: float, limit: int = 16
    ) -> builtins.list[CompletionRecord]:
        async with self._lock:
            now = time.time()
            expired = sorted(
                (
                    held.record
                    for held in self._completions.values()
                    if held.record.state == "running" and held.record.lease_until <= now
                ),
                key=lambda r: (r.created_at, r.completion_id),
            )[:limit]
            for record in expired:
                record.owner, record.lease_until, record.updated_at = (
                    owner,
                    now + lease_seconds,
                    now,
                )
            return [copy.deepcopy(r) for r in expired]

    async def renew(
        self, owner: str, completion_ids: Sequence[str], lease_seconds: float
    ) -> builtins.list[str]:
        async with self._lock:
            now, lost = time.time(), []
            for completion_id in completion_ids:
                held = self._completions.get(completion_id)
                record = held.record if held is not None else None
                if record is None or record.state != "running" or record.owner != owner:
                    lost.append(completion_id)
                    continue
                record.lease_until, record.updated_at = now + lease_seconds, now
            return lost

    # -- retention ---------------------------------------------------------------------------

    async def delete(self, completion_id: str) -> bool:
        async with self._lock:
            return self._delete(completion_id)

    def _delete(self, completion_id: str) -> bool:
        found = self._completions.pop(completion_id, None) is not None
        self._release_blobs(completion_id)
        return found

    async def prune(self, *, max_age_seconds: float | None, max_bytes: int | None) -> int:
        async with self._lock:
            ended = sorted(
                (h.record for h in self._completions.values() if h.record.state != "running"),
                key=lambda r: (r.updated_at, r.completion_id),
            )
            deleted = 0
            if max_age_seconds is not None:
                cutoff = time.time() - max_age_seconds
                for record in [r for r in ended if r.updated_at < cutoff]:
                    deleted += self._delete(record.completion_id)
                    ended.remove(record)
            while max_bytes is not None and ended and self.size_bytes() > max_bytes:
                deleted += self._delete(ended.pop(0).completion_id)
            return deleted

    def size_bytes(self) -> int:
        """What the store holds: every completion's size and every blob's."""
        own = sum(h.record.size_bytes for h in self._completions.values())
        return own + sum(len(b) for b in self._blobs.values())

    def __repr__(self) -> str:
        return f"MemoryJournalStore({len(self._completions)} completions, {len(self._blobs)} blobs)"


def _implements(store: MemoryJournalStore) -> JournalStore:
    return store  # type-checked: the whole interface, with its signatures
