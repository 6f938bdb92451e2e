"""Appends on the SQLite store, the hot path: a batch's sub-calls append at once.

Appends to one completion that continue each other and queue while the store's thread is busy
are joined into one run: one UPDATE of the completion's counter (its last number must be the
one before the run: a second writer and a gap are refused alike) and one executemany of all
their rows, instead of two statements each. Each caller still awaits its own outcome; a refused
run refuses every append joined to it (they continued the refused one: none could follow).
"""

from __future__ import annotations

import asyncio
import functools
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
    # Each caller's own future: the run's outcome is given to each.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    # Set by the store's thread when the run starts: nothing joins it after that.
    closed: bool = False


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
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run = self._open.get(key)
        if run is not None:
            with self._lock:
                joined = not run.closed and first == run.last + 1
                if joined:
                    run.rows.extend(rows)
                    run.last, run.size = last, run.size + size
                    run.waiters.append(mine)
            if joined:
                return await mine
        run = _Run(what, completion_id, first, last, size, list(rows), waiters=[mine])
        self._open[key] = run
        db.submit(self._op(run), write=True).add_done_callback(
            functools.partial(self._done, key, run)
        )
        # A caller awaits a future of its own: one cancelled cancels neither the others' nor
        # the write, which goes on.
        await mine

    def _done(self, key: tuple[What, str], run: _Run, outcome: asyncio.Future[None]) -> None:
        if self._open.get(key) is run:
            del self._open[key]
        error = None if outcome.cancelled() else outcome.exception()
        for waiter in run.waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

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
