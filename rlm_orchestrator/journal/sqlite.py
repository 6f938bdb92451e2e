"""The embedded journal store, the default: one SQLite file in a directory the user chooses.

WAL with synchronous=NORMAL: a commit survives the process being killed (not the machine losing
power) without an fsync per commit. The connection lives on a thread of its own
(`dbthread.py`), which commits concurrent writes together. Several processes may share the
file (a restarted server beside its predecessor, tests): every write transaction is
`BEGIN IMMEDIATE`, so `claim` is atomic across them, and a busy file is waited for.

An append is one UPDATE of the completion's narrow row (its last seq must be the one before
the new entries: that refuses a second writer and a gap alike) and the INSERT of the rows, both
in the same transaction.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from rlm_orchestrator.exceptions import JournalError
from rlm_orchestrator.journal import sqlite_retention as retention
from rlm_orchestrator.journal.dbthread import ConnectionThread, Op
from rlm_orchestrator.journal.rows import (
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
    run_of,
    sha256,
)
from rlm_orchestrator.journal.sqlite_appends import Appends
from rlm_orchestrator.journal.store import CompletionRecord, Entry, Event, State

T = TypeVar("T")
FILE_NAME = "journal.db"
# How long a write waits for another process holding the file's write lock.
BUSY_TIMEOUT_SECONDS = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal_completions (
    completion_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT NOT NULL,
    state TEXT NOT NULL, owner TEXT NOT NULL, lease_until REAL NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, size_bytes INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, last_offset INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_completions_created ON journal_completions (created_at);
CREATE INDEX IF NOT EXISTS journal_completions_lease
    ON journal_completions (state, lease_until);
CREATE TABLE IF NOT EXISTS journal_documents (
    completion_id TEXT PRIMARY KEY, request TEXT NOT NULL, result TEXT, extra TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal_entries (
    completion_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    payload TEXT NOT NULL, PRIMARY KEY (completion_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_events (
    completion_id TEXT NOT NULL, event_offset INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (completion_id, event_offset)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS journal_blob_refs (
    completion_id TEXT NOT NULL, digest TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (completion_id, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_blob_refs_digest ON journal_blob_refs (digest);
"""
_SELECT_RECORD = f"SELECT {RECORD_COLUMNS} FROM {RECORD_FROM}"


def connect(path: Path) -> sqlite3.Connection:
    """The file opened (and made, with its schema, when new) as the store uses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    try:
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect on a new file
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        connection.execute(
            "INSERT OR IGNORE INTO journal_meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
        )
        (version,) = connection.execute(
            "SELECT value FROM journal_meta WHERE key = 'schema_version'"
        ).fetchone()
        if int(version) > SCHEMA_VERSION:
            raise JournalError(
                f"{path}: journal schema version {version} is newer than this version's "
                f"({SCHEMA_VERSION}): upgrade rlm-orchestrator"
            )
    except BaseException:
        connection.close()
        raise
    return connection


class SqliteJournalStore:
    """A `JournalStore` in `directory`/journal.db (the directory is made when missing)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()
        self.path = self.directory / FILE_NAME
        self._db: ConnectionThread | None = None
        self._appends = Appends()

    async def open(self) -> None:
        if self._db is None:
            db = ConnectionThread(lambda: connect(self.path), "rlm-journal-sqlite")
            await db.start()
            self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.stop()

    async def __aenter__(self) -> SqliteJournalStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _open_db(self) -> ConnectionThread:
        if self._db is None:
            raise JournalError(f"the journal store {self.path} is not open")
        return self._db

    async def _call(self, op: Op[T], *, write: bool) -> T:
        return await self._open_db().call(op, write=write)

    async def put_blob(self, completion_id: str, data: bytes) -> str:
        data = bytes(data)

        def op(db: sqlite3.Connection) -> str:
            digest = sha256(data)  # here, off the loop (hashlib lets go of the GIL)
            stored = db.execute("SELECT 1 FROM journal_blobs WHERE digest = ?", (digest,))
            if stored.fetchone() is None:  # else stored once: not written again
                db.execute("INSERT INTO journal_blobs VALUES (?, ?, ?)", (digest, len(data), data))
            db.execute(
                "INSERT OR IGNORE INTO journal_blob_refs VALUES (?, ?, ?)",
                (completion_id, digest, time.time()),
            )
            return digest

        return await self._call(op, write=True)

    async def blob(self, digest: str) -> bytes:
        def op(db: sqlite3.Connection) -> bytes:
            row = db.execute("SELECT data FROM journal_blobs WHERE digest = ?", (digest,))
            found = row.fetchone()
            if found is None:
                raise KeyError(digest)
            return bytes(found[0])

        return await self._call(op, write=False)

    async def begin(self, record: CompletionRecord) -> None:
        check_begin(record)
        request, extra = dumps(record.request), dumps(record.extra)
        r = record

        def op(db: sqlite3.Connection) -> None:
            now = time.time()
            try:
                db.execute(
                    "INSERT INTO journal_completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
                    (r.completion_id, r.tenant, r.session_id, r.state, r.owner, r.lease_until,
                     now, now, len(request) + len(extra)),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise ValueError(f"completion {r.completion_id} is already there") from None
            db.execute(
                "INSERT INTO journal_documents VALUES (?, ?, NULL, ?)",
                (r.completion_id, request, extra),
            )

        await self._call(op, write=True)

    async def append(self, completion_id: str, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        first, last = run_of([e.seq for e in entries], "entry")
        rows, size = entry_rows(completion_id, entries)
        await self._appends.add(self._open_db(), "entry", completion_id, rows, size, first, last)

    async def append_events(self, completion_id: str, events: Sequence[Event]) -> None:
        if not events:
            return
        first, last = run_of([e.offset for e in events], "event")
        rows, size = event_rows(completion_id, events)
        await self._appends.add(self._open_db(), "event", completion_id, rows, size, first, last)

    async def entries(self, completion_id: str) -> list[Entry]:
        def op(db: sqlite3.Connection) -> list[Entry]:
            rows = db.execute(
                "SELECT seq, kind, payload FROM journal_entries WHERE completion_id = ? "
                "ORDER BY seq",
                (completion_id,),
            )
            return [Entry(seq, kind, json.loads(payload)) for seq, kind, payload in rows]

        return await self._call(op, write=False)

    async def events(self, completion_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        def op(db: sqlite3.Connection) -> list[Event]:
            rows = db.execute(
                "SELECT event_offset, data FROM journal_events WHERE completion_id = ? "
                "AND event_offset > ? ORDER BY event_offset LIMIT ?",
                (completion_id, after, limit),
            )
            return [Event(offset, bytes(data)) for offset, data in rows]

        return await self._call(op, write=False)

    async def get(self, completion_id: str) -> CompletionRecord | None:
        return await self._call(lambda db: _get(db, completion_id), write=False)

    async def find(
        self, *, state: State | None = None, tenant: str | None = None, limit: int = 100
    ) -> list[CompletionRecord]:
        where, params = ["1"], list[str]()
        if state is not None:
            where.append("c.state = ?")
            params.append(state)
        if tenant is not None:
            where.append("c.tenant = ?")
            params.append(tenant)
        query = (
            f"{_SELECT_RECORD} WHERE {' AND '.join(where)} ORDER BY c.created_at DESC, "
            "c.completion_id LIMIT ?"
        )

        def op(db: sqlite3.Connection) -> list[CompletionRecord]:
            return [record(row) for row in db.execute(query, (*params, limit))]

        return await self._call(op, write=False)

    async def end(self, completion_id: str, state: State, result: dict[str, Any]) -> None:
        check_end(state)
        text = dumps(result)

        def op(db: sqlite3.Connection) -> None:
            changed = db.execute(
                "UPDATE journal_completions SET state = ?, owner = '', lease_until = 0, "
                "updated_at = ?, size_bytes = size_bytes + ? - (SELECT coalesce(length(result), "
                "0) FROM journal_documents WHERE completion_id = ?) WHERE completion_id = ?",
                (state, time.time(), len(text), completion_id, completion_id),
            )
            if changed.rowcount != 1:
                raise KeyError(completion_id)
            db.execute(
                "UPDATE journal_documents SET result = ? WHERE completion_id = ?",
                (text, completion_id),
            )

        await self._call(op, write=True)

    async def claim(
        self, owner: str, lease_seconds: float, limit: int = 16
    ) -> list[CompletionRecord]:
        def op(db: sqlite3.Connection) -> list[CompletionRecord]:
            now = time.time()
            ids = [
                cid
                for (cid,) in db.execute(
                    "SELECT completion_id FROM journal_completions WHERE state = 'running' "
                    "AND lease_until <= ? ORDER BY created_at LIMIT ?",
                    (now, limit),
                )
            ]
            db.executemany(
                "UPDATE journal_completions SET owner = ?, lease_until = ?, updated_at = ? "
                "WHERE completion_id = ?",
                [(owner, now + lease_seconds, now, cid) for cid in ids],
            )
            return [r for r in (_get(db, cid) for cid in ids) if r is not None]

        return await self._call(op, write=True)

    async def renew(
        self, owner: str, completion_ids: Sequence[str], lease_seconds: float
    ) -> list[str]:
        ids = list(completion_ids)

        def op(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            lost = []
            for cid in ids:
                held = db.execute(
                    "UPDATE journal_completions SET lease_until = ?, updated_at = ? "
                    "WHERE completion_id = ? AND owner = ? AND state = 'running'",
                    (now + lease_seconds, now, cid, owner),
                )
                if held.rowcount != 1:
                    lost.append(cid)
            return lost

        return await self._call(op, write=True) if ids else []

    async def delete(self, completion_id: str) -> bool:
        return await self._call(
            lambda db: retention.delete(db, completion_id) is not None, write=True
        )

    async def prune(self, *, max_age_seconds: float | None, max_bytes: int | None) -> int:
        deleted = 0
        await self._call(retention.drop_orphan_refs, write=True)
        while max_age_seconds is not None:
            cutoff = time.time() - max_age_seconds
            count = await self._call(
                functools.partial(retention.prune_older, cutoff=cutoff), write=True
            )
            deleted += count
            if count < PRUNE_CHUNK:
                break
        while max_bytes is not None:
            count, done = await self._call(
                functools.partial(retention.prune_to, max_bytes=max_bytes), write=True
            )
            deleted += count
            if done:
                break
        if deleted:  # give the freed pages back to the file system
            await self._call(
                lambda db: db.execute("PRAGMA incremental_vacuum").fetchall(), write=True
            )
        return deleted


def _get(db: sqlite3.Connection, completion_id: str) -> CompletionRecord | None:
    row = db.execute(f"{_SELECT_RECORD} WHERE c.completion_id = ?", (completion_id,)).fetchone()
    return None if row is None else record(row)
