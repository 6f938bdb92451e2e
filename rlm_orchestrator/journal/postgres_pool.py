"""The PostgreSQL store's connections: a few per process, and appends to one completion kept
in the order they were called."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection

Connection = AsyncConnection[tuple[Any, ...]]


class Pool:
    """A few connections (autocommit: a statement alone is its own transaction), handed out one
    caller at a time; a broken one is dropped and replaced on demand."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            finally:
                idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if conn.closed or conn.broken or not idle:
                    await conn.close()
                else:
                    self._idle.append(conn)

    async def _connect(self) -> Connection:
        return await AsyncConnection.connect(
            self._dsn, autocommit=True, application_name="rlm-orchestrator journal"
        )

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


class InOrder:
    """Appends to one completion, one at a time in the order they were called (a FIFO lock per
    completion): a caller may issue a batch's appends without awaiting each, as on SQLite, where
    one queue orders them; here they would otherwise race over separate connections."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
