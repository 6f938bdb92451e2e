"""Sandboxes started ahead of demand, handed out at acquire, refilled in the background.

A provider gives the pool how to start and stop one of its sandboxes; the pool keeps `size`
of them idle (none older than `max_idle_seconds`), hands one out when it fits the request
(`fits`: a sandbox started with other limits does not) and starts a replacement at once.
Everything it holds belongs to one event loop: a server's, which is where pools make sense.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from rlm_orchestrator.sandbox.base import Sandbox, SandboxSpec
from rlm_orchestrator.telemetry import metrics

log = logging.getLogger("rlm_orchestrator.sandbox.warm_pool")

POOL_SESSION = "pool"
RETRY_SECONDS = 1.0  # after a failed start (the machine may be briefly out of something)


@dataclass
class _Idle:
    sandbox: Sandbox
    started: float


class WarmPool:
    def __init__(
        self,
        start: Callable[[SandboxSpec], Awaitable[Sandbox]],
        stop: Callable[[Sandbox], Coroutine[Any, Any, None]],
        alive: Callable[[Sandbox], bool],
        size: int,
        max_idle_seconds: float,
        backend: str = "local",
    ) -> None:
        self._start = start
        self._stop = stop
        self._alive = alive
        self.size = size
        self.max_idle_seconds = max_idle_seconds
        self._idle: list[_Idle] = []
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._discarding: set[asyncio.Task[None]] = set()
        self._refilling = asyncio.Lock()
        self.hits = 0
        self.misses = 0
        self.backend = backend
        metrics.watch_warm_pool(self, backend)

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, spec: SandboxSpec, fits: Callable[[Sandbox], bool]) -> Sandbox | None:
        """An idle sandbox that fits, now relabelled for `spec`; a refill starts behind it."""
        if self.size == 0:
            return None
        self._ensure_filler()
        for dead in [idle for idle in self._idle if not self._alive(idle.sandbox)]:
            self._idle.remove(dead)
            self._discard(dead.sandbox)
        taken = next((idle for idle in self._idle if fits(idle.sandbox)), None)
        metrics.warm_pool_take(self.backend, taken is not None)
        if taken is None:
            self.misses += 1
            return None
        self._idle.remove(taken)
        self._wanted.set()
        self.hits += 1
        taken.sandbox.spec = spec
        return taken.sandbox

    def _discard(self, sandbox: Sandbox) -> None:
        self._wanted.set()
        task = asyncio.create_task(self._stop(sandbox), name="warm-pool-discard")
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def fill(self) -> None:
        """Start sandboxes until the pool is full (and keep it so from now on)."""
        if self.size == 0:
            return
        self._ensure_filler()
        await self._refill()

    async def _refill(self) -> None:
        async with self._refilling:  # the filler and fill() must not both start sandboxes
            while len(self._idle) < self.size:
                sandbox = await self._start(SandboxSpec(session_id=POOL_SESSION))
                self._idle.append(_Idle(sandbox, time.monotonic()))

    def _ensure_filler(self) -> None:
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._keep_full(), name="warm-pool")
            self._wanted.set()

    async def _keep_full(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # wake up now and then to evict stale ones
                await asyncio.wait_for(self._wanted.wait(), self.max_idle_seconds / 2)
            self._wanted.clear()
            await self._evict_stale()
            try:
                await self._refill()
            except Exception as exc:
                log.warning("could not refill the warm pool: %s", exc)
                await asyncio.sleep(RETRY_SECONDS)
                self._wanted.set()

    async def _evict_stale(self) -> None:
        now = time.monotonic()
        stale = [idle for idle in self._idle if now - idle.started > self.max_idle_seconds]
        for idle in stale:
            self._idle.remove(idle)
            await self._stop(idle.sandbox)

    async def aclose(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
            self._filler = None
        idle, self._idle = self._idle, []
        await asyncio.gather(
            *(self._stop(entry.sandbox) for entry in idle), *list(self._discarding)
        )
