"""Appends on the SQLite store, the hot path: a batch's sub-calls append at once.

Appends to one completion that continue each other and queue while the store's thread is busy
are joined into one run: one UPDATE of the completion's counter (its last number must be the
one before the run: a second writer and a gap are refused alike) and one executemany of all
their rows, instead of two statements each. Each caller still awaits its own outcome; a refused
run refuses every append joined to it (they continued the refused one: none could follow).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from rlm_orchestrator.journal.dbthread import ConnectionThread
from rlm_orchestrator.journal.rows import refusal

What = Literal["entry", "event"]
_COLUMN = {"entry": "last_seq", "event": "last_offset"}
_INSERT = {
    "entry": "INSERT INTO journal_entries VALUES (?, ?, ?, ?)",
    "event": "INSERT INTO journal_events VALUES (?, ?, ?)",
}
_ADVANCE = {
    what: f"UPDATE journal_completions SET {column} = ?, size_bytes = size_bytes + ?, "
    f"updated_at = ? WHERE completion_id = ? AND {column} = ? AND state = 'running'"
    for what, column in _COLUMN.items()
}


@dataclass
class _Run:
    what: What
    completion_id: str
    first: int
    last: int
    size: int
    rows: list[tuple[Any, ...]]
    # Set by the store's thread when the run starts: nothing joins it after that.
    closed: bool = False
    future: asyncio.Future[None] = field(init=False)


class Appends:
    """The runs not yet started, one per (kind, completion) at most."""

    def __init__(self) -> None:
        self._open: dict[tuple[What, str], _Run] = {}
        self._lock = threading.Lock()  # `closed` and the rows, between the loop and the thread

    async def add(
        self,
        db: ConnectionThread,
        what: What,
        completion_id: str,
        rows: list[tuple[Any, ...]],
        size: int,
        first: int,
        last: int,
    ) -> None:
        key = (what, completion_id)
        run = self._open.get(key)
        if run is not None:
            with self._lock:
                joined = not run.closed and first == run.last + 1
                if joined:
                    run.rows.extend(rows)
                    run.last, run.size = last, run.size + size
            if joined:
                return await _outcome_of(run.future)
        run = _Run(what, completion_id, first, last, size, list(rows))
        run.future = db.submit(self._op(run), write=True)
        self._open[key] = run
        run.future.add_done_callback(lambda _: self._forget(key, run))
        await _outcome_of(run.future)

    def _forget(self, key: tuple[What, str], run: _Run) -> None:
        if self._open.get(key) is run:
            del self._open[key]

    def _op(self, run: _Run) -> Any:
        def op(db: sqlite3.Connection) -> None:
            with self._lock:
                run.closed = True
            cid, what = run.completion_id, run.what
            moved = db.execute(
                _ADVANCE[what], (run.last, run.size, time.time(), cid, run.first - 1)
            )
            if moved.rowcount != 1:
                found = db.execute(
                    f"SELECT state, {_COLUMN[what]} FROM journal_completions "
                    "WHERE completion_id = ?",
                    (cid,),
                ).fetchone()
                raise refusal(cid, found, run.first, what)
            try:
                if len(run.rows) == 1:
                    db.execute(_INSERT[what], run.rows[0])
                else:
                    db.executemany(_INSERT[what], run.rows)
            except sqlite3.IntegrityError as exc:  # rows the counter did not count
                raise ValueError(f"{what} {run.first} of completion {cid}: {exc}") from exc

        return op


async def _outcome_of(shared: asyncio.Future[None]) -> None:
    """Awaits a run's outcome through a future of this caller's own: a cancelled caller does
    not cancel the others' (nor the write, which goes on)."""
    mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def copy(done: asyncio.Future[None]) -> None:
        if mine.done():
            return
        if done.cancelled():
            mine.cancel()
        elif (error := done.exception()) is not None:
            mine.set_exception(error)
        else:
            mine.set_result(None)

    shared.add_done_callback(copy)
    await mine
