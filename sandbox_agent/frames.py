"""Framing of the pipes between the agent and its worker process.

A frame is a 4-byte big-endian length, a 1-byte kind and the payload. Output frames and value
chunks carry UTF-8 text; the others carry JSON. Never pickle: the worker runs untrusted code,
and what it sends must not be able to run code in the agent. User code can also write frames of
its own to the pipe: the agent checks every frame it reads (`protocol.py`, `limits.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

HEADER = struct.Struct(">IB")
# The worker's sanity limit on what the agent sends it (code, loaded-value paths, sub-call
# answers): the agent is trusted, this only stops a desynchronised pipe from allocating.
# What the worker sends is bounded much tighter, by the agent (limits.MAX_FRAME_BYTES).
MAX_COMMAND_BYTES = 256 * 1024 * 1024


class Kind:
    """Frame kinds. Upper case travels agent -> worker, lower case worker -> agent."""

    EXECUTE = ord("E")
    LOAD = ord("L")
    GET_VARIABLE = ord("G")
    READ_CHUNK = ord("C")
    LLM_RESPONSE = ord("R")

    READY = ord("y")
    STDOUT = ord("o")
    STDERR = ord("e")
    LLM_REQUEST = ord("q")
    DONE = ord("d")
    LOADED = ord("l")
    VARIABLE = ord("v")
    CHUNK = ord("c")


def encode(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def encode_json(kind: int, obj: Any) -> bytes:
    return encode(kind, json.dumps(obj, separators=(",", ":")).encode())


class FrameError(Exception):
    """The peer sent something that is not a frame."""


class BlockingChannel:
    """The worker's end: blocking reads on one fd, locked writes on another.

    Writes come from several threads (output flushes, llm_query callers, the main loop), so
    each frame is written whole under a lock.
    """

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        critical: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._write_lock = threading.Lock()
        self._pid = os.getpid()
        # Defers KeyboardInterrupt (how the agent stops user code) until a frame is whole:
        # a frame cut in the middle would desynchronise the pipe for good.
        self._critical = critical

    def send(self, kind: int, payload: bytes) -> None:
        if os.getpid() != self._pid:
            return  # a child forked by user code: its frames would interleave with ours
        data = memoryview(encode(kind, payload))
        with self._critical(), self._write_lock:
            while data:
                written = os.write(self._write_fd, data)
                data = data[written:]

    def send_json(self, kind: int, obj: Any) -> None:
        self.send(kind, json.dumps(obj, separators=(",", ":")).encode())

    def _read_exactly(self, size: int) -> bytes | None:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            chunk = os.read(self._read_fd, min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> tuple[int, bytes] | None:
        """The next frame, or None when the agent has closed the pipe."""
        header = self._read_exactly(HEADER.size)
        if header is None:
            return None
        size, kind = HEADER.unpack(header)
        if size > MAX_COMMAND_BYTES:
            raise FrameError(f"frame of {size} bytes exceeds {MAX_COMMAND_BYTES}")
        payload = self._read_exactly(size) if size else b""
        if payload is None:
            return None
        return kind, payload
