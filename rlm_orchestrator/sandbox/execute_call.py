"""The Execute call an AgentClient keeps open between code blocks.

A new gRPC call costs about twice a message round trip on an open stream, so blocks share one
call (sandbox.proto, Execute): it is opened for the first block, reused by the next ones, and
dropped (cancelled) on any error or cancellation, the next block opening a fresh one.

Writes go out in order, never two at once (gRPC allows one write in flight per call): the
start of a block is written by the block's own task when nothing else is being written, the
answers to sub-calls by a writer task. A sub-call task that is cancelled (its block ended)
must never cancel a write half-way: that would cancel the call, hence the writer task.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from rlm_wire.v1 import sandbox_pb2 as pb


class ExecuteCall:
    def __init__(self, call: Any) -> None:
        self.call = call  # grpc.aio StreamStreamCall, in its read()/write() style
        self.blocks = 0  # blocks started on it
        self.busy = False  # a block runs on it
        # The agent keeps the stream open after a result (ExecuteResult.stream_open).
        self.reusable = False
        self._outgoing: asyncio.Queue[pb.ExecuteRequest | None] = asyncio.Queue()
        self._write_lock = asyncio.Lock()  # one write in flight
        self._writer = asyncio.create_task(self._write_queued(), name="execute-writer")

    @property
    def usable(self) -> bool:
        return self.reusable and not self.call.done() and not self._writer.done()

    async def start(self, message: pb.ExecuteRequest) -> None:
        """Send a block's start, written by the caller's task when nothing waits to be written
        (one task hop less). Nothing else can be sent for the block before its start is."""
        self.blocks += 1
        if self._write_lock.locked() or not self._outgoing.empty():
            self._outgoing.put_nowait(message)
            return
        async with self._write_lock:
            await self.call.write(message)

    def send(self, message: pb.ExecuteRequest) -> None:
        """Queue a message (the answer to a sub-call) behind those not written yet."""
        self._outgoing.put_nowait(message)

    async def read(self) -> pb.ExecuteResponse | None:
        """The next message; None when the agent ended the stream with OK."""
        message = await self.call.read()
        return None if message is grpc.aio.EOF else message

    def half_close(self) -> None:
        """End the stream once the queued messages are written (the agent then ends it)."""
        self._outgoing.put_nowait(None)

    def cancel(self) -> None:
        self.call.cancel()
        self._writer.cancel()

    async def _write_queued(self) -> None:
        # A failed write means a failed call: its reader gets the status.
        with contextlib.suppress(Exception):
            while (message := await self._outgoing.get()) is not None:
                async with self._write_lock:
                    await self.call.write(message)
            async with self._write_lock:
                await self.call.done_writing()
