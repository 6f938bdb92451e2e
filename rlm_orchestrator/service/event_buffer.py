"""A completion's events on their way to a client that may read slowly, or not at all.

The completion never waits for its client (other clients' completions share the event loop,
and a stalled reader must not stall a sandbox), so what the client has not read yet is held
here, bounded by bytes. When the buffer is full, output chunks and sub-call events are dropped
and counted; the next event that gets in is preceded by a marker (an `output` event with
`dropped_chars` / `dropped_events`) saying how much was lost. Everything else is kept: the
structure of the run (turns, root responses, code blocks, notices: bounded in size by the
excerpts, in number by the LM calls), the usage (each update carries the whole usage so far,
so a newer one replaces one still waiting), `finished` and `failed`. Answer parts are the only
events whose producer can wait for room (`put_waiting`).
"""

from __future__ import annotations

import asyncio
from collections import deque

from rlm_wire.v1 import orchestrator_pb2 as pb

# What a queued message costs beyond its encoded size (the Python objects around it).
MESSAGE_OVERHEAD_BYTES = 256
DROPPABLE = frozenset({"output", "sub_call_started", "sub_call_finished"})


def _cost(message: pb.CompletionEvent) -> int:
    return message.ByteSize() + MESSAGE_OVERHEAD_BYTES


class EventBuffer:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[pb.CompletionEvent | None] = deque()
        self._bytes = 0
        self._changed = asyncio.Event()
        self._dropped_chars = 0
        self._dropped_events = 0
        self._last_dropped: pb.CompletionOutput | None = None
        self.dropped_chars_total = 0
        self.dropped_events_total = 0

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def put(self, message: pb.CompletionEvent) -> None:
        """Queue `message`, or drop it when it is droppable and the buffer is full."""
        kind = message.WhichOneof("kind")
        cost = _cost(message)
        # Once dropping, go on until the reader has taken half: one marker per gap, not one
        # per event that happens to fit.
        room = self.max_bytes // 2 if self._dropping() else self.max_bytes
        full = self._bytes + cost > room
        if full and kind in DROPPABLE:
            self._drop(message, kind)
            return
        if kind == "usage":
            self._forget_waiting_usage()
        self._append(message, cost)

    async def put_waiting(self, message: pb.CompletionEvent) -> None:
        """Queue `message` once there is room for it (or the buffer is empty)."""
        cost = _cost(message)
        while self._items and self._bytes + cost > self.max_bytes:
            self._changed.clear()
            await self._changed.wait()
        self._append(message, cost)

    def close(self) -> None:
        """No more events: the reader gets None after the last one."""
        self._flush_marker()
        self._items.append(None)
        self._changed.set()

    async def get(self) -> pb.CompletionEvent | None:
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        message = self._items.popleft()
        if message is not None:
            self._bytes -= _cost(message)
        self._changed.set()  # room for a waiting producer
        return message

    def _dropping(self) -> bool:
        return bool(self._dropped_chars or self._dropped_events)

    def _append(self, message: pb.CompletionEvent, cost: int) -> None:
        self._flush_marker()
        self._items.append(message)
        self._bytes += cost
        self._changed.set()

    def _drop(self, message: pb.CompletionEvent, kind: str) -> None:
        if kind == "output":
            self._dropped_chars += len(message.output.text)
            self.dropped_chars_total += len(message.output.text)
            self._last_dropped = message.output
        else:
            self._dropped_events += 1
            self.dropped_events_total += 1

    def _forget_waiting_usage(self) -> None:
        """A newer usage update makes one the reader has not taken yet redundant."""
        for index in range(len(self._items) - 1, -1, -1):
            waiting = self._items[index]
            if waiting is not None and waiting.WhichOneof("kind") == "usage":
                del self._items[index]
                self._bytes -= _cost(waiting)
                return

    def _flush_marker(self) -> None:
        """Tell the client what was dropped, just before the next event it gets."""
        if not self._dropping():
            return
        where = self._last_dropped or pb.CompletionOutput(stream="stdout")
        text = (
            f"\n[... the server dropped {self._dropped_chars} characters of output and "
            f"{self._dropped_events} sub-call events here: this client read its stream more "
            "slowly than the completion produced it ...]\n"
        )
        marker = pb.CompletionEvent(
            output=pb.CompletionOutput(
                depth=where.depth,
                iteration=where.iteration,
                block=where.block,
                stream=where.stream,
                text=text,
                dropped_chars=self._dropped_chars,
                dropped_events=self._dropped_events,
            )
        )
        self._dropped_chars = self._dropped_events = 0
        self._last_dropped = None
        self._items.append(marker)
        self._bytes += _cost(marker)
