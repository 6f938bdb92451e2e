"""The journal store that several server replicas share: PostgreSQL, through psycopg 3 (the
`postgres` extra, imported only by the postgres*.py modules, and they only when the settings
name PostgreSQL). Its connections: postgres_pool.py; its tables, appends and deletion:
postgres_schema.py.

Safe across processes: an append is one statement that moves the completion's counter (its
last seq must be the one before the new entries) and inserts the rows, and the primary key
(completion_id, seq) refuses what a racing writer put there anyway; `claim` takes expired
leases with `FOR UPDATE SKIP LOCKED`, so two replicas never take the same completion; times
(leases, ages) are the database's clock, the one clock every replica shares. A blob's row is
locked while a completion takes a reference to it and while its last reference goes, so a
blob is never freed under a completion that just stored it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors

from rlm_orchestrator.exceptions import JournalError
from rlm_orchestrator.journal.postgres_pool import Connection, InOrder, Pool
from rlm_orchestrator.journal.postgres_schema import (
    APPEND_ENTRIES,
    APPEND_EVENTS,
    NOW,
    create_schema,
    delete,
)
from rlm_orchestrator.journal.rows import (
    ORPHAN_GRACE_SECONDS,
    PRUNE_CHUNK,
    RECORD_COLUMNS,
    RECORD_FROM,
    SCHEMA_VERSION,
    check_begin,
    check_end,
    dumps,
    entry_rows,
    event_rows,
    record,
    refusal,
    run_of,
    sha256,
)
from rlm_orchestrator.journal.store import CompletionRecord, Entry, Event, State

T = TypeVar("T")
# Hashing a blob this large leaves the event loop.
_HASH_OFF_LOOP_BYTES = 1 << 20

_SELECT_RECORD = f"SELECT {RECORD_COLUMNS} FROM {RECORD_FROM}"


class PostgresJournalStore:
    """A `JournalStore` in a PostgreSQL database (`dsn`: a libpq connection string or URL)."""

    def __init__(self, dsn: str, *, max_connections: int = 4) -> None:
        self.dsn = dsn
        self._max_connections = max_connections
        self._pool: Pool | None = None
        self._in_order = InOrder()
        self._writing: set[asyncio.Future[Exception | None]] = set()

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = Pool(self.dsn, self._max_connections)
        try:
            async with pool.connection() as conn:
                version = await create_schema(conn)
        except psycopg.Error as exc:
            await pool.close()
            raise JournalError(f"cannot open the journal database: {exc}") from exc
        if version > SCHEMA_VERSION:
            await pool.close()
            raise JournalError(
                f"journal schema version {version} is newer than this version's "
                f"({SCHEMA_VERSION}): upgrade rlm-orchestrator"
            )
        self._pool = pool

    async def close(self) -> None:
        if self._writing:  # appends whose callers were cancelled: let them land
            await asyncio.wait(set(self._writing))
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> PostgresJournalStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        if self._pool is None:
            raise JournalError("the journal store is not open")
        try:
            async with self._pool.connection() as conn:
                return await work(conn)
        except psycopg.Error as exc:
            raise JournalError(f"journal database error: {exc}") from exc

    async def _rows(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        async def work(conn: Connection) -> list[Any]:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()

        return await self._run(work)

    async def put_blob(self, completion_id: str, data: bytes) -> str:
        data = bytes(data)
        big = len(data) >= _HASH_OFF_LOOP_BYTES
        digest = await asyncio.to_thread(sha256, data) if big else sha256(data)

        async def work(conn: Connection) -> None:
            async with conn.transaction():
                # Locked (shared) while the reference is made: `delete` cannot free it meanwhile.
                found = await conn.execute(
                    "SELECT 1 FROM journal_blobs WHERE digest = %s FOR SHARE", (digest,)
                )
                if await found.fetchone() is None:  # else stored once: not sent again
                    await conn.execute(
                        "INSERT INTO journal_blobs VALUES (%s, %s, %s) ON CONFLICT (digest) "
                        "DO UPDATE SET size = excluded.size",  # locks the row as well
                        (digest, len(data), data),
                    )
                await conn.execute(
                    f"INSERT INTO journal_blob_refs VALUES (%s, %s, {NOW}) ON CONFLICT DO NOTHING",
                    (completion_id, digest),
                )

        await self._run(work)
        return digest

    async def blob(self, digest: str) -> bytes:
        rows = await self._rows("SELECT data FROM journal_blobs WHERE digest = %s", (digest,))
        if not rows:
            raise KeyError(digest)
        return bytes(rows[0][0])

    async def begin(self, record: CompletionRecord) -> None:
        check_begin(record)
        request, extra = dumps(record.request), dumps(record.extra)
        r = record

        async def work(conn: Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO journal_completions VALUES "
                    f"(%s, %s, %s, %s, %s, %s, {NOW}, {NOW}, %s, 0, 0)",
                    (r.completion_id, r.tenant, r.session_id, r.state, r.owner,
                     r.lease_until, len(request) + len(extra)),
                )  # fmt: skip
                await conn.execute(
                    "INSERT INTO journal_documents VALUES (%s, %s::json, NULL, %s::json)",
                    (r.completion_id, request, extra),
                )

        try:
            await self._run(work)
        except JournalError as exc:
            if isinstance(exc.__cause__, errors.UniqueViolation):
                raise ValueError(f"completion {r.completion_id} is already there") from None
            raise

    async def append(self, completion_id: str, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        first, last = run_of([e.seq for e in entries], "entry")
        rows, size = entry_rows(completion_id, entries)
        arrays = ([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
        await self._append(completion_id, "entry", APPEND_ENTRIES, arrays, size, first, last)

    async def append_events(self, completion_id: str, events: Sequence[Event]) -> None:
        if not events:
            return
        first, last = run_of([e.offset for e in events], "event")
        rows, size = event_rows(completion_id, events)
        arrays = ([r[1] for r in rows], [r[2] for r in rows])
        await self._append(completion_id, "event", APPEND_EVENTS, arrays, size, first, last)

    async def _append(
        self,
        completion_id: str,
        what: str,
        statement: str,
        arrays: tuple[list[Any], ...],
        size: int,
        first: int,
        last: int,
    ) -> None:
        column = "last_seq" if what == "entry" else "last_offset"

        async def work(conn: Connection) -> Exception | None:
            try:
                cursor = await conn.execute(
                    statement, (last, size, completion_id, first - 1, *arrays)
                )
            except errors.UniqueViolation as exc:  # rows the counter did not count
                return ValueError(f"{what} {first} of completion {completion_id}: {exc}")
            if cursor.rowcount > 0:
                return None
            found = await conn.execute(
                f"SELECT state, {column} FROM journal_completions WHERE completion_id = %s",
                (completion_id,),
            )
            return refusal(completion_id, await found.fetchone(), first, what)

        async def in_turn() -> Exception | None:
            async with self._in_order.turn(completion_id):
                return await self._run(work)

        # A task of its own, started now (tasks start in the order they are made: the turns
        # are taken in call order), shielded: a cancelled caller's append is written all the
        # same, as on SQLite, and those after it still follow it.
        writing = asyncio.ensure_future(in_turn())
        self._writing.add(writing)
        writing.add_done_callback(self._writing.discard)
        refused = await asyncio.shield(writing)
        if refused is not None:
            raise refused

    async def entries(self, completion_id: str) -> list[Entry]:
        rows = await self._rows(
            "SELECT seq, kind, payload FROM journal_entries WHERE completion_id = %s ORDER BY seq",
            (completion_id,),
        )
        return [Entry(seq, kind, payload) for seq, kind, payload in rows]

    async def events(self, completion_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        rows = await self._rows(
            "SELECT event_offset, data FROM journal_events WHERE completion_id = %s "
            "AND event_offset > %s ORDER BY event_offset LIMIT %s",
            (completion_id, after, limit),
        )
        return [Event(offset, bytes(data)) for offset, data in rows]

    async def get(self, completion_id: str) -> CompletionRecord | None:
        rows = await self._rows(f"{_SELECT_RECORD} WHERE c.completion_id = %s", (completion_id,))
        return record(rows[0]) if rows else None

    async def find(
        self, *, state: State | None = None, tenant: str | None = None, limit: int = 100
    ) -> list[CompletionRecord]:
        rows = await self._rows(
            f"{_SELECT_RECORD} WHERE (%s::text IS NULL OR c.state = %s) AND "
            "(%s::text IS NULL OR c.tenant = %s) "
            "ORDER BY c.created_at DESC, c.completion_id LIMIT %s",
            (state, state, tenant, tenant, limit),
        )
        return [record(row) for row in rows]

    async def end(self, completion_id: str, state: State, result: dict[str, Any]) -> None:
        check_end(state)
        text = dumps(result)

        async def work(conn: Connection) -> bool:
            async with conn.transaction():
                changed = await conn.execute(
                    "UPDATE journal_completions SET state = %s, owner = '', lease_until = 0, "
                    f"updated_at = {NOW}, size_bytes = size_bytes + %s - (SELECT "
                    "coalesce(length(result::text), 0) FROM journal_documents WHERE "
                    "completion_id = %s) WHERE completion_id = %s",
                    (state, len(text), completion_id, completion_id),
                )
                if changed.rowcount != 1:
                    return False
                await conn.execute(
                    "UPDATE journal_documents SET result = %s::json WHERE completion_id = %s",
                    (text, completion_id),
                )
                return True

        if not await self._run(work):
            raise KeyError(completion_id)

    async def claim(
        self, owner: str, lease_seconds: float, limit: int = 16
    ) -> list[CompletionRecord]:
        rows = await self._rows(
            f"""WITH picked AS (
                SELECT completion_id FROM journal_completions
                WHERE state = 'running' AND lease_until <= {NOW}
                ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED)
            UPDATE journal_completions c SET owner = %s, lease_until = {NOW} + %s,
                updated_at = {NOW}
            FROM picked WHERE c.completion_id = picked.completion_id
            RETURNING c.completion_id""",
            (limit, owner, lease_seconds),
        )
        if not rows:
            return []
        claimed = await self._rows(
            f"{_SELECT_RECORD} WHERE c.completion_id = ANY(%s) ORDER BY c.created_at",
            ([cid for (cid,) in rows],),
        )
        return [record(row) for row in claimed]

    async def renew(
        self, owner: str, completion_ids: Sequence[str], lease_seconds: float
    ) -> list[str]:
        ids = list(completion_ids)
        if not ids:
            return []
        rows = await self._rows(
            f"UPDATE journal_completions SET lease_until = {NOW} + %s, updated_at = {NOW} "
            "WHERE completion_id = ANY(%s) AND owner = %s AND state = 'running' "
            "RETURNING completion_id",
            (lease_seconds, ids, owner),
        )
        held = {cid for (cid,) in rows}
        return [cid for cid in ids if cid not in held]

    async def delete(self, completion_id: str) -> bool:
        return await self._delete(completion_id) is not None

    async def _delete(self, completion_id: str) -> int | None:
        return await self._run(functools.partial(delete, completion_id=completion_id))

    async def prune(self, *, max_age_seconds: float | None, max_bytes: int | None) -> int:
        orphans = await self._rows(
            "SELECT DISTINCT completion_id FROM journal_blob_refs r "
            f"WHERE created_at < {NOW} - %s AND NOT EXISTS (SELECT 1 FROM "
            "journal_completions c WHERE c.completion_id = r.completion_id)",
            (ORPHAN_GRACE_SECONDS,),
        )
        for (cid,) in orphans:
            await self._delete(cid)
        deleted = 0
        while max_age_seconds is not None:
            ids = await self._ended_oldest(f"updated_at < {NOW} - %s", max_age_seconds)
            for cid in ids:
                if await self._delete(cid) is not None:
                    deleted += 1
            if len(ids) < PRUNE_CHUNK:
                break
        while max_bytes is not None:
            ((total,),) = await self._rows(
                "SELECT (SELECT coalesce(sum(size_bytes), 0) FROM journal_completions) + "
                "(SELECT coalesce(sum(size), 0) FROM journal_blobs)"
            )
            ids = await self._ended_oldest("true") if total > max_bytes else []
            for cid in ids:
                if total <= max_bytes:
                    break
                freed = await self._delete(cid)
                if freed is not None:
                    total -= freed
                    deleted += 1
            if total <= max_bytes or len(ids) < PRUNE_CHUNK:
                break
        return deleted

    async def _ended_oldest(self, where: str, *params: Any) -> list[str]:
        rows = await self._rows(
            "SELECT completion_id FROM journal_completions WHERE state <> 'running' AND "
            f"{where} ORDER BY updated_at LIMIT %s",
            (*params, PRUNE_CHUNK),
        )
        return [cid for (cid,) in rows]
