"""The PostgreSQL store's tables and its statements with more than one step: the schema made
once (replicas starting together wait on an advisory lock), an append in one statement, and a
completion's deletion with its blobs."""

from __future__ import annotations

from rlm_orchestrator.journal.postgres_pool import Connection
from rlm_orchestrator.journal.rows import SCHEMA_VERSION

# The database's clock: the one every replica shares (leases, ages).
NOW = "extract(epoch from statement_timestamp())::float8"
# Serializes schema creation between replicas starting at once (pg_advisory_xact_lock).
_SCHEMA_LOCK = 0x726C6D6A  # "rlmj"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS journal_meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS journal_completions (
        completion_id text PRIMARY KEY, tenant text NOT NULL, session_id text NOT NULL,
        state text NOT NULL, owner text NOT NULL, lease_until float8 NOT NULL,
        created_at float8 NOT NULL, updated_at float8 NOT NULL, size_bytes bigint NOT NULL,
        last_seq bigint NOT NULL, last_offset bigint NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS journal_completions_created ON journal_completions (created_at)",
    "CREATE INDEX IF NOT EXISTS journal_completions_lease "
    "ON journal_completions (state, lease_until)",
    """CREATE TABLE IF NOT EXISTS journal_documents (
        completion_id text PRIMARY KEY, request json NOT NULL, result json, extra json NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS journal_entries (
        completion_id text NOT NULL, seq bigint NOT NULL, kind text NOT NULL,
        payload json NOT NULL, PRIMARY KEY (completion_id, seq))""",
    """CREATE TABLE IF NOT EXISTS journal_events (
        completion_id text NOT NULL, event_offset bigint NOT NULL, data bytea NOT NULL,
        PRIMARY KEY (completion_id, event_offset))""",
    """CREATE TABLE IF NOT EXISTS journal_blobs (
        digest text PRIMARY KEY, size bigint NOT NULL, data bytea NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS journal_blob_refs (
        completion_id text NOT NULL, digest text NOT NULL, created_at float8 NOT NULL,
        PRIMARY KEY (completion_id, digest))""",
    "CREATE INDEX IF NOT EXISTS journal_blob_refs_digest ON journal_blob_refs (digest)",
)
_APPEND = """
WITH moved AS (
    UPDATE journal_completions SET {column} = %s, size_bytes = size_bytes + %s,
        updated_at = {now}
    WHERE completion_id = %s AND {column} = %s AND state = 'running'
    RETURNING completion_id)
INSERT INTO journal_{table} SELECT moved.completion_id, {values}
FROM moved, unnest({arrays}) AS s({names})
"""
APPEND_ENTRIES = _APPEND.format(
    column="last_seq", now=NOW, table="entries", values="s.seq, s.kind, s.payload::json",
    arrays="%s::bigint[], %s::text[], %s::text[]", names="seq, kind, payload",
)  # fmt: skip
APPEND_EVENTS = _APPEND.format(
    column="last_offset", now=NOW, table="events", values="s.event_offset, s.data",
    arrays="%s::bigint[], %s::bytea[]", names="event_offset, data",
)  # fmt: skip


async def create_schema(conn: Connection) -> int:
    """The tables made when missing; the schema version the database holds."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in _SCHEMA:
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO journal_meta VALUES ('schema_version', %s) ON CONFLICT DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
        cursor = await conn.execute("SELECT value FROM journal_meta WHERE key = 'schema_version'")
        return int((await cursor.fetchone() or ("0",))[0])


async def delete(conn: Connection, completion_id: str) -> int | None:
    """Delete a completion in one transaction: the bytes freed (its own and its blobs'); None
    when there was none (its blob references, if any, are dropped all the same)."""
    async with conn.transaction():
        found = await (
            await conn.execute(
                "DELETE FROM journal_completions WHERE completion_id = %s RETURNING size_bytes",
                (completion_id,),
            )
        ).fetchone()
        for table in ("entries", "events", "documents"):
            await conn.execute(
                f"DELETE FROM journal_{table} WHERE completion_id = %s", (completion_id,)
            )
        refs = await conn.execute(
            "DELETE FROM journal_blob_refs WHERE completion_id = %s RETURNING digest",
            (completion_id,),
        )
        digests = sorted(d for (d,) in await refs.fetchall())
        freed = 0
        if digests:
            # Locked first (in one order: no deadlock between two deletes), then a fresh look at
            # the references: one made meanwhile, committed, keeps its blob.
            await conn.execute(
                "SELECT 1 FROM journal_blobs WHERE digest = ANY(%s) ORDER BY digest FOR UPDATE",
                (digests,),
            )
            gone = await conn.execute(
                "DELETE FROM journal_blobs b WHERE digest = ANY(%s) AND NOT EXISTS (SELECT 1 "
                "FROM journal_blob_refs r WHERE r.digest = b.digest) RETURNING size",
                (digests,),
            )
            freed = sum(size for (size,) in await gone.fetchall())
    return None if found is None else int(found[0]) + freed
