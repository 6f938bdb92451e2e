"""Deleting completions on the SQLite store: one alone (`delete`), and retention (`prune`: by
age, then by size, oldest ended first), with the blobs no completion refers to any more. Each
function runs on the store's thread, inside a write transaction.
"""

from __future__ import annotations

import time
from sqlite3 import Connection
from typing import Any

from rlm_orchestrator.journal.rows import ORPHAN_GRACE_SECONDS, PRUNE_CHUNK


def release_blobs(db: Connection, completion_id: str) -> int:
    """Drop `completion_id`'s blob references, and the blobs nothing else refers to; the
    bytes freed."""
    digests = [
        d
        for (d,) in db.execute(
            "SELECT digest FROM journal_blob_refs WHERE completion_id = ?", (completion_id,)
        )
    ]
    db.execute("DELETE FROM journal_blob_refs WHERE completion_id = ?", (completion_id,))
    freed = 0
    for digest in digests:
        if db.execute(
            "SELECT 1 FROM journal_blob_refs WHERE digest = ? LIMIT 1", (digest,)
        ).fetchone():
            continue
        size = db.execute("SELECT size FROM journal_blobs WHERE digest = ?", (digest,)).fetchone()
        if size is not None:
            freed += size[0]
            db.execute("DELETE FROM journal_blobs WHERE digest = ?", (digest,))
    return freed


def delete(db: Connection, completion_id: str) -> int | None:
    """Delete a completion: the bytes freed (its own and its blobs'); None when there was none
    (its blob references, if any, are dropped all the same)."""
    found = db.execute(
        "SELECT size_bytes FROM journal_completions WHERE completion_id = ?", (completion_id,)
    ).fetchone()
    for table in ("entries", "events", "documents", "completions"):
        db.execute(f"DELETE FROM journal_{table} WHERE completion_id = ?", (completion_id,))
    freed = release_blobs(db, completion_id)
    return None if found is None else found[0] + freed


def drop_orphan_refs(db: Connection) -> None:
    """References from completions that never began (their blob stored, then the server gone)."""
    orphans = db.execute(
        "SELECT DISTINCT completion_id FROM journal_blob_refs r WHERE created_at < ? AND NOT "
        "EXISTS (SELECT 1 FROM journal_completions c WHERE c.completion_id = r.completion_id)",
        (time.time() - ORPHAN_GRACE_SECONDS,),
    ).fetchall()
    for (completion_id,) in orphans:
        release_blobs(db, completion_id)


def ended_oldest(db: Connection, where: str = "1", *params: Any) -> list[str]:
    return [
        cid
        for (cid,) in db.execute(
            "SELECT completion_id FROM journal_completions WHERE state != 'running' AND "
            f"{where} ORDER BY updated_at LIMIT ?",
            (*params, PRUNE_CHUNK),
        )
    ]


def prune_older(db: Connection, cutoff: float) -> int:
    ids = ended_oldest(db, "updated_at < ?", cutoff)
    for cid in ids:
        delete(db, cid)
    return len(ids)


def prune_to(db: Connection, max_bytes: int) -> tuple[int, bool]:
    """Delete the oldest ended completions (a chunk at most) while the store holds more than
    max_bytes: (how many, whether done)."""
    (total,) = db.execute(
        "SELECT (SELECT coalesce(sum(size_bytes), 0) FROM journal_completions) + "
        "(SELECT coalesce(sum(size), 0) FROM journal_blobs)"
    ).fetchone()
    if total <= max_bytes:
        return 0, True
    ids = ended_oldest(db)
    deleted = 0
    for cid in ids:
        if total <= max_bytes:
            break
        total -= delete(db, cid) or 0
        deleted += 1
    return deleted, total <= max_bytes or len(ids) < PRUNE_CHUNK
