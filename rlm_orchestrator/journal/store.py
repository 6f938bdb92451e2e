"""The journal store: what a durable completion is made of, and the small interface every store
implements (`sqlite.py`, embedded, the default; `postgres.py`, shared by server replicas).

A completion is one row (`CompletionRecord`) and two append-only logs:
- entries: what rebuilds it, in order (`Entry.kind`): "root" (a root model response with its
  usage), "sub_calls" (one request of the code's sub-calls: prompts' hashes, model, kind, and
  the answers in order), "block" (a finished code block: code, outputs, status), "turn" (the
  end of a turn: what the model was told), "load" (a value loaded into the REPL, by blob hash);
- events: the client-visible events (serialized `rlm.v1.CompletionEvent`), numbered from 1, so
  a client can re-attach after event N and miss nothing, see nothing twice.
Large values (contexts) are blobs stored once by content hash (sha256 hex); each completion
that put one holds a reference to it, so that deleting the last one frees it.

Every `append*` is durable when it returns (committed; on SQLite, WAL with synchronous=NORMAL:
it survives the process being killed, not the machine losing power). Ownership: a running
completion has an `owner` (a server instance's id) and a `lease_until` (epoch seconds); a
server renews the leases of what it runs, and `claim` hands a starting (or surviving) server
the running completions whose lease expired, atomically: two servers never both claim one.

Errors: KeyError (no such completion or blob), ValueError (a refused write: a seq out of
order, an ended completion), `JournalError` (the store itself failed: unreachable, full).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from rlm_orchestrator.exceptions import JournalError

__all__ = [
    "ENDED_STATES",
    "CompletionRecord",
    "Entry",
    "Event",
    "JournalError",
    "JournalStore",
    "State",
]

State = Literal["running", "finished", "failed", "cancelled"]
ENDED_STATES: tuple[State, ...] = ("finished", "failed", "cancelled")


@dataclass(frozen=True)
class Entry:
    """One step of a completion, in order (`seq` from 1 within the completion)."""

    seq: int
    kind: str
    payload: dict[str, Any]  # JSON-serializable


@dataclass(frozen=True)
class Event:
    """One client-visible event (`offset` from 1 within the completion)."""

    offset: int
    data: bytes  # a serialized rlm.v1.CompletionEvent


@dataclass
class CompletionRecord:
    completion_id: str
    # What started it (JSON-serializable): options, root prompt, models, the context's blob
    # hash and encoding; enough for another server to run it again.
    request: dict[str, Any]
    tenant: str = ""
    session_id: str = ""
    state: State = "running"
    owner: str = ""
    lease_until: float = 0.0  # epoch seconds
    created_at: float = 0.0  # epoch seconds; set by the store on `begin`
    updated_at: float = 0.0
    # How it ended (JSON-serializable), once it did.
    result: dict[str, Any] | None = None
    # Bytes it takes in the store (entries, events; blobs not included), for retention.
    size_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class JournalStore(Protocol):
    """Every method is safe to call concurrently from one event loop; stores that several
    servers share are safe across processes too. Appends to one completion made by one store
    are applied in the order they were called, so a batch's appends may be issued together
    (`asyncio.gather`) rather than each awaited in turn; an append whose caller is cancelled is
    written all the same (so the ones after it still follow it)."""

    async def open(self) -> None:
        """Create the schema if needed (idempotent) and connect."""

    async def close(self) -> None: ...

    async def put_blob(self, completion_id: str, data: bytes) -> str:
        """Store `data` once (by content), referenced by `completion_id` (which need not have
        begun yet: a context is stored before its completion); its sha256 hex."""

    async def blob(self, digest: str) -> bytes:
        """A blob's bytes; KeyError when there is none."""

    async def begin(self, record: CompletionRecord) -> None:
        """A new running completion (created_at/updated_at set by the store; an id already
        there is a ValueError)."""

    async def append(self, completion_id: str, entries: Sequence[Entry]) -> None:
        """Entries after the last one, all or none (their `seq` continue it: a seq already
        there, two writers, or a gap is a ValueError; so is a completion that ended)."""

    async def append_events(self, completion_id: str, events: Sequence[Event]) -> None:
        """Events after the last one (same rule as `append`)."""

    async def entries(self, completion_id: str) -> list[Entry]: ...

    async def events(self, completion_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events with offset > after, in order, at most `limit`."""

    async def get(self, completion_id: str) -> CompletionRecord | None: ...

    async def find(
        self, *, state: State | None = None, tenant: str | None = None, limit: int = 100
    ) -> list[CompletionRecord]:
        """Newest first."""

    async def end(self, completion_id: str, state: State, result: dict[str, Any]) -> None:
        """The completion ended: no owner, no lease, its result kept (KeyError: no such one)."""

    async def claim(
        self, owner: str, lease_seconds: float, limit: int = 16
    ) -> list[CompletionRecord]:
        """Running completions whose lease expired, now owned by `owner` until now +
        lease_seconds (atomic: a completion is claimed by one caller only)."""

    async def renew(
        self, owner: str, completion_ids: Sequence[str], lease_seconds: float
    ) -> list[str]:
        """Extend the leases `owner` still holds; the ids it no longer holds (taken over)."""

    async def delete(self, completion_id: str) -> bool:
        """Remove a completion, its entries and events (and blobs no completion uses)."""

    async def prune(self, *, max_age_seconds: float | None, max_bytes: int | None) -> int:
        """Delete ended completions older than max_age_seconds, then the oldest ended ones
        until the store holds at most max_bytes; how many were deleted. Running ones stay."""
