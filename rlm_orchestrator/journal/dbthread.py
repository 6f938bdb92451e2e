"""One SQLite connection on a thread of its own, so that the event loop never waits on the disk
or on another process's lock.

Calls are queued from the loop and run in order. Whatever queued while the thread was busy runs
as one batch: if it writes, in one `BEGIN IMMEDIATE` transaction committed once. A commit is
the costly part of a write (a WAL write and the file locks, ~40 us on a VM's disk), so
concurrent appends (a batch's sub-calls) share one; and a batch's results reach the loop in one
wake-up. A call returns once its transaction committed. When a call of a batch is refused, the
batch runs again with a savepoint per call, so that only that one is rolled back: calls must
be safe to run again after a rollback."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rlm_orchestrator.exceptions import JournalError

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]
# At most this many calls in one transaction: bounds the wait of the call that comes next.
MAX_BATCH = 512


@dataclass(slots=True)
class _Call:
    op: Op[Any]
    write: bool
    future: asyncio.Future[Any]


class _BatchAborted(Exception):
    """The transaction itself failed: every call of the batch fails with `cause`."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


def _translated(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        error = JournalError(f"journal database error: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _settle(calls: list[_Call], outcomes: list[tuple[bool, Any]]) -> None:
    for call, (ok, value) in zip(calls, outcomes, strict=True):
        if call.future.done():  # its caller was cancelled: the work was done regardless
            continue
        if ok:
            call.future.set_result(value)
        else:
            call.future.set_exception(value)


class ConnectionThread:
    """`await call(op, write=...)` runs `op(connection)` on the thread; `start`/`stop` open
    and close the connection there (`connect` is called on the thread)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._connect = connect
        self._name = name
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready, self._stopped), name=self._name, daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None  # `start` may be tried again
            raise

    async def call(self, op: Op[T], *, write: bool) -> T:
        return await self.submit(op, write=write)

    def submit(self, op: Op[T], *, write: bool) -> asyncio.Future[T]:
        """Queues `op`: the future of its outcome (cancelling it does not stop the op)."""
        if self._thread is None or self._closing:
            raise JournalError("the journal store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Call(op, write, future))
        return future

    async def stop(self) -> None:
        """Runs what was queued, then closes the connection (idempotent)."""
        if self._thread is None or self._closing or self._stopped is None:
            return
        self._closing = True
        self._queue.put(None)
        await asyncio.shield(self._stopped)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop closed without stopping us: nobody is waiting.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self, ready: asyncio.Future[None], stopped: asyncio.Future[None]) -> None:
        try:
            connection = self._connect()
        except BaseException as exc:
            self._to_loop(_resolve, ready, _translated(exc))
            self._to_loop(_resolve, stopped, None)
            return
        self._to_loop(_resolve, ready, None)
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._to_loop(_settle, batch, self._execute(connection, batch))
        finally:
            connection.close()
            self._to_loop(_resolve, stopped, None)

    def _execute(
        self, connection: sqlite3.Connection, batch: list[_Call]
    ) -> list[tuple[bool, Any]]:
        if not any(call.write for call in batch):
            return [_outcome(connection, call.op) for call in batch]
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(False, _translated(exc))] * len(batch)
        try:
            if len(batch) == 1:  # alone: no savepoint, a refusal rolls the transaction back
                outcomes = [_outcome(connection, batch[0].op)]
                if outcomes[0][0]:
                    connection.execute("COMMIT")
                elif connection.in_transaction:  # (SQLite may have rolled it back already)
                    connection.execute("ROLLBACK")
                return outcomes
            # Optimistic: no savepoints (two statements a call saved). A refusal is rare (a
            # bug, a lost race): then the batch is rolled back and run again, a savepoint each.
            outcomes = []
            for call in batch:
                outcome = _outcome(connection, call.op)
                if not outcome[0]:
                    break  # (none may run after it: SQLite may have ended the transaction)
                outcomes.append(outcome)
            if len(outcomes) < len(batch):
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                connection.execute("BEGIN IMMEDIATE")
                outcomes = [_in_savepoint(connection, call.op) for call in batch]
            connection.execute("COMMIT")
            return outcomes
        except (_BatchAborted, sqlite3.Error) as exc:
            cause = exc.cause if isinstance(exc, _BatchAborted) else exc
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            return [(False, _translated(cause))] * len(batch)


def _outcome(connection: sqlite3.Connection, op: Op[Any]) -> tuple[bool, Any]:
    try:
        return True, op(connection)
    except Exception as exc:
        return False, _translated(exc)


def _in_savepoint(connection: sqlite3.Connection, op: Op[Any]) -> tuple[bool, Any]:
    connection.execute("SAVEPOINT call")
    try:
        result = op(connection)
    except Exception as exc:
        try:
            connection.execute("ROLLBACK TO call")
            connection.execute("RELEASE call")
        except sqlite3.Error as lost:  # SQLite rolled the whole transaction back (I/O, full)
            raise _BatchAborted(exc) from lost
        return False, _translated(exc)
    connection.execute("RELEASE call")
    return True, result
