"""An agent that stops by itself when its orchestrator is gone.

The orchestrator holds an `Attach` stream open for as long as it owns the sandbox. When the
orchestrator dies, even by SIGKILL, the kernel closes its end of the connection and the stream
ends. With an orphan timeout T, the agent stops once no attachment has been open for T seconds
(counted from its start too, so that an orchestrator that dies before attaching is covered).
A container or a remote sandbox then never outlives its owner by much more than T.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("sandbox_agent")


class OrphanWatch:
    """Counts open attachments; calls `on_orphaned` after `timeout` seconds without one."""

    def __init__(self, timeout: float, on_orphaned: Callable[[], None]) -> None:
        self.timeout = timeout
        self.attachments = 0
        self._on_orphaned = on_orphaned
        self._unattached_since = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._unattached_since = asyncio.get_running_loop().time()
        if self.timeout > 0:
            self._task = asyncio.create_task(self._watch(), name="orphan-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def attach(self) -> int:
        self.attachments += 1
        return self.attachments

    def detach(self) -> None:
        self.attachments -= 1
        if self.attachments == 0:
            self._unattached_since = asyncio.get_running_loop().time()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        # Checked a few times per timeout: the agent stops within about 1.25 T.
        interval = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            if self.attachments == 0 and loop.time() - self._unattached_since >= self.timeout:
                log.warning(
                    "no orchestrator attached for %.0f s: stopping (orphaned sandbox)",
                    self.timeout,
                )
                self._on_orphaned()
                return
