"""The frames read from a worker and not handled yet, bounded.

One task reads the worker's pipe into the inbox, the executor takes frames out. When the inbox
is full the reader stops reading, the pipe fills up and the worker blocks in its own write():
a worker that writes faster than the agent forwards costs the agent a bounded amount of memory
(INBOX_BYTES plus one frame), never a growing queue.
"""

from __future__ import annotations

import asyncio
from collections import deque

INBOX_FRAMES = 1024
INBOX_BYTES = 4 * 1024 * 1024

Frame = tuple[int, bytes]


class Inbox:
    def __init__(self) -> None:
        self._frames: deque[Frame] = deque()
        self._bytes = 0
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def _full(self) -> bool:
        # One frame always fits (frames are bounded by their kind's limit): never a deadlock.
        return bool(self._frames) and (
            len(self._frames) >= INBOX_FRAMES or self._bytes >= INBOX_BYTES
        )

    async def put(self, frame: Frame) -> None:
        while self._full():
            self._writable.clear()
            await self._writable.wait()
        self._frames.append(frame)
        self._bytes += len(frame[1])
        self._readable.set()

    def close(self) -> None:
        """No more frames: once the waiting ones are taken, `get` returns None."""
        self._closed = True
        self._readable.set()

    async def get(self) -> Frame | None:
        while not self._frames:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        frame = self._frames.popleft()
        self._bytes -= len(frame[1])
        self._writable.set()
        return frame

    def has_frame(self) -> bool:
        """A frame is waiting (get() will not wait)."""
        return bool(self._frames)
