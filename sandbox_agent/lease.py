"""Fleet mode: one session at a time, and nothing of it left for the next.

A long-running agent (a pod of a fleet) is leased by an orchestrator for one session. While
leased, it refuses other sessions; the holder renews the lease, and a lease not renewed
within its TTL (the orchestrator vanished) ends by itself. Ending a lease throws the worker
and its namespace away, empties the work dir and forgets loaded values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sandbox_agent.executor import Executor

log = logging.getLogger("sandbox_agent.lease")
LEASE_METADATA = "rlm-lease"


class LeaseError(Exception):
    """Why a lease operation was refused."""


@dataclass
class Lease:
    lease_id: str
    session_id: str
    holder: str
    ttl: float
    expires: float


class LeaseKeeper:
    def __init__(self, executor: Executor, default_ttl: float = 60.0) -> None:
        self.executor = executor
        self.default_ttl = default_ttl
        self.active: Lease | None = None
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="lease-expiry")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def lease(self, session_id: str, holder: str, ttl: float) -> Lease:
        async with self._lock:
            if self.active is not None:
                raise LeaseError(f"leased by another session ({self.active.session_id})")
            ttl = ttl or self.default_ttl
            self.active = Lease(uuid.uuid4().hex, session_id, holder, ttl, time.monotonic() + ttl)
            log.warning("leased to session %s by %s", session_id, holder)
            return self.active

    def renew(self, lease_id: str) -> Lease:
        lease = self.active
        if lease is None or lease.lease_id != lease_id:
            raise LeaseError("no such active lease (it expired or was released)")
        lease.expires = time.monotonic() + lease.ttl
        return lease

    async def release(self, lease_id: str) -> None:
        async with self._lock:
            if self.active is None or self.active.lease_id != lease_id:
                raise LeaseError("no such active lease (it expired or was released)")
            await self._end("released")

    async def _end(self, why: str) -> None:
        lease, self.active = self.active, None
        if lease is not None:
            log.warning("lease of session %s %s: resetting the sandbox", lease.session_id, why)
        self.executor.interrupt("cancelled")
        await self.executor.reset()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            lease = self.active
            if lease is not None and time.monotonic() > lease.expires:
                async with self._lock:
                    if self.active is lease:
                        await self._end("expired")

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when the call carries the active lease, else why it is refused."""
        lease_ids = [str(v) for k, v in metadata or () if k == LEASE_METADATA]
        if self.active is None:
            return "this fleet agent is not leased: call Lease first"
        if lease_ids != [self.active.lease_id]:
            return "leased by another session"
        return None
