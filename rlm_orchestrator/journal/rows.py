"""What both stores share: the tables' layout, JSON in and out, and the checks made before a
write reaches the database (so that a bad call is refused the same way by both).

The tables (names prefixed `journal_`, so that a shared PostgreSQL database can hold them
beside others):
- completions: one narrow row per completion, the columns that change while it runs (state,
  owner, lease, counters: last entry seq, last event offset, size): an append rewrites only
  this row, never the request, which may be large;
- documents: the JSON written once or twice per completion (request, result, extra);
- entries, events: the two logs, keyed by (completion_id, seq / event_offset);
- blobs, blob_refs: content by sha256, and which completion uses which (for deletion);
- meta: the schema's version.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from typing import Any

from rlm_orchestrator.journal.store import ENDED_STATES, CompletionRecord, Entry, Event, State

SCHEMA_VERSION = 1
# A blob referenced by a completion that never began is freed by `prune` after this long.
ORPHAN_GRACE_SECONDS = 3600.0
# `prune` deletes this many completions per transaction (others' writes go in between).
PRUNE_CHUNK = 64

RECORD_COLUMNS = (
    "c.completion_id, c.tenant, c.session_id, c.state, c.owner, c.lease_until, c.created_at, "
    "c.updated_at, c.size_bytes, d.request, d.result, d.extra"
)
RECORD_FROM = "journal_completions c JOIN journal_documents d USING (completion_id)"
STATES = ("running", *ENDED_STATES)


def dumps(value: Any) -> str:
    """Compact JSON, ASCII only: its length is its size in bytes."""
    return json.dumps(value, separators=(",", ":"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def loads_doc(value: Any) -> Any:
    """A JSON column: text (SQLite) or already decoded (PostgreSQL's json type)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def record(row: Sequence[Any]) -> CompletionRecord:
    """A CompletionRecord from a row of RECORD_COLUMNS."""
    (cid, tenant, session_id, state, owner, lease, created, updated, size, request, result,
     extra) = row  # fmt: skip
    return CompletionRecord(
        completion_id=cid,
        request=loads_doc(request),
        tenant=tenant,
        session_id=session_id,
        state=state,
        owner=owner,
        lease_until=float(lease),
        created_at=float(created),
        updated_at=float(updated),
        result=None if result is None else loads_doc(result),
        size_bytes=int(size),
        extra=loads_doc(extra),
    )


def check_begin(record: CompletionRecord) -> None:
    if not record.completion_id:
        raise ValueError("a completion needs an id")
    if record.state != "running":
        raise ValueError(f"a completion begins running, not {record.state!r}")


def check_end(state: State) -> None:
    if state not in ENDED_STATES:
        raise ValueError(f"a completion ends {', '.join(ENDED_STATES)}; not {state!r}")


def run_of(numbers: Sequence[int], what: str) -> tuple[int, int]:
    """(first, last) of numbers that must follow each other by one, from 1 or more."""
    first = numbers[0]
    if len(numbers) == 1 and first >= 1:  # the common case: one sub-call's entry
        return first, first
    if first < 1:
        raise ValueError(f"{what} numbers start at 1, not {first}")
    for previous, number in itertools.pairwise(numbers):
        if number != previous + 1:
            raise ValueError(f"{what} {number} does not follow {previous}")
    return first, numbers[-1]


def entry_rows(completion_id: str, entries: Sequence[Entry]) -> tuple[list[tuple[Any, ...]], int]:
    """The rows of `entries` (payloads as JSON text) and their size in bytes."""
    rows = [(completion_id, e.seq, e.kind, dumps(e.payload)) for e in entries]
    return rows, sum(len(r[2]) + len(r[3]) for r in rows)


def event_rows(completion_id: str, events: Sequence[Event]) -> tuple[list[tuple[Any, ...]], int]:
    rows = [(completion_id, e.offset, bytes(e.data)) for e in events]
    return rows, sum(len(r[2]) for r in rows)


def refusal(completion_id: str, found: tuple[str, int] | None, first: int, what: str) -> Exception:
    """Why a write after `first - 1` was refused, given the completion's (state, last number)
    read after the refusal (None: there is no such completion)."""
    if found is None:
        return KeyError(completion_id)
    state, last = found
    if state != "running":
        return ValueError(f"completion {completion_id} has ended ({state}): no {what} after it")
    if first <= last:
        return ValueError(
            f"{what} {first} of completion {completion_id} is already there (last: {last}): "
            "two writers?"
        )
    return ValueError(f"{what} {first} of completion {completion_id} does not follow {last}")
