"""Output capture inside the worker: coalescing into chunks and a per-execution cap.

Everything user code writes (print, sys.stdout.write, and bytes written to fd 1/2 by C code or
child processes) lands here. Output is sent to the agent in chunks of up to CHUNK_CHARS, or
FLUSH_INTERVAL after the first unsent write, so a block that prints in a tight loop costs a
few large frames rather than one per print. Past the cap, the first half of the allowance has
been streamed already; the last half is kept in a bounded tail and sent at the end, after a
marker saying how much was cut. Memory stays bounded whatever the code prints. Frames hold
at most OUTPUT_FRAME_CHARS characters: the agent rejects bigger ones (and counts, and caps,
what it forwards: this capture is a courtesy of the worker, not the enforcement).
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass

from sandbox_agent.frames import BlockingChannel, Kind
from sandbox_agent.limits import OUTPUT_FRAME_CHARS

CHUNK_CHARS = 32 * 1024
FLUSH_INTERVAL = 0.02
STDOUT, STDERR = Kind.STDOUT, Kind.STDERR


@dataclass
class StreamTotals:
    """What one stream produced during an execution."""

    chars: int = 0
    dropped: int = 0


class _Tail:
    """The last `capacity` characters written, trimmed lazily so appends stay O(1)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def append(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > 2 * self.capacity + CHUNK_CHARS:
            self._trim()

    def _trim(self) -> None:
        joined = "".join(self.parts)
        keep = joined[-self.capacity :] if self.capacity else ""
        self.dropped += len(joined) - len(keep)
        self.parts = [keep] if keep else []
        self.size = len(keep)

    def take(self) -> str:
        self._trim()
        text = "".join(self.parts)
        self.parts, self.size = [], 0
        return text


class OutputCapture:
    """Collects both streams of the current execution and ships them to the agent."""

    def __init__(self, channel: BlockingChannel, max_chars: int) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[tuple[int, str]] = []
        self._pending_chars = 0
        # Head characters sent since the last execution ended: output of threads that outlive
        # their block. The agent counts them against the next execution, so do we.
        self._sent_head = {STDOUT: 0, STDERR: 0}
        self.begin(max_chars)
        threading.Thread(target=self._flush_loop, name="output-flusher", daemon=True).start()

    def begin(self, max_chars: int) -> None:
        """Start counting a new execution with its own cap (per stream)."""
        with self._lock:
            self._reset(max_chars)
            self.totals = {STDOUT: StreamTotals(), STDERR: StreamTotals()}

    def _reset(self, max_chars: int) -> None:
        head = max_chars - max_chars // 2
        self._max_chars = max_chars
        self._head_left = {s: max(0, head - sent) for s, sent in self._sent_head.items()}
        self._tails = {STDOUT: _Tail(max_chars // 2), STDERR: _Tail(max_chars // 2)}

    def write(self, stream: int, text: str) -> None:
        if not text:
            return
        with self._lock:
            self.totals[stream].chars += len(text)
            head_left = self._head_left[stream]
            if head_left > 0:
                head = text[:head_left]
                self._head_left[stream] = head_left - len(head)
                self._sent_head[stream] += len(head)
                self._queue(stream, head)
                text = text[len(head) :]
            if text:
                self._tails[stream].append(text)

    def _queue(self, stream: int, text: str) -> None:
        if not self._pending:
            self._wake.notify()
        self._pending.append((stream, text))
        self._pending_chars += len(text)
        if self._pending_chars >= CHUNK_CHARS:
            self._flush_locked()

    def _flush_locked(self) -> None:
        pending, self._pending, self._pending_chars = self._pending, [], 0
        # Adjacent pieces of the same stream become one frame; order across streams is kept.
        run_stream = pending[0][0] if pending else STDOUT
        run: list[str] = []
        for stream, text in pending:
            if stream != run_stream and run:
                self._send(run_stream, "".join(run))
                run = []
            run_stream = stream
            run.append(text)
        if run:
            self._send(run_stream, "".join(run))

    def _send(self, stream: int, text: str) -> None:
        for start in range(0, len(text), OUTPUT_FRAME_CHARS):
            piece = text[start : start + OUTPUT_FRAME_CHARS]
            self._channel.send(stream, piece.encode("utf-8", "replace"))

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_loop(self) -> None:
        # Sleeps on the condition while idle: an idle worker costs no wake-ups.
        with self._lock:
            while True:
                while not self._pending:
                    self._wake.wait()
                self._wake.wait(FLUSH_INTERVAL)
                if self._pending:
                    self._flush_locked()

    def end(self) -> dict[int, StreamTotals]:
        """Send what is left (with the cut marker and the tail) and return the totals."""
        with self._lock:
            for stream in (STDOUT, STDERR):
                tail = self._tails[stream]
                text = tail.take()
                if tail.dropped:
                    self.totals[stream].dropped = tail.dropped
                    marker = f"\n... [{tail.dropped} characters of output truncated] ...\n"
                    self._queue(stream, marker)
                if text:
                    self._queue(stream, text)
            self._flush_locked()
            # What is written from now on (by threads still running) counts for the next one.
            self._sent_head = {STDOUT: 0, STDERR: 0}
            self._reset(self._max_chars)
            return self.totals


class CaptureStream(io.TextIOBase):
    """What sys.stdout / sys.stderr are in the worker."""

    def __init__(self, capture: OutputCapture, stream: int, fileno: int) -> None:
        self._capture = capture
        self._stream = stream
        self._fileno = fileno
        self._pid = os.getpid()
        self.buffer = _BinaryAdapter(self)

    @property
    def encoding(self) -> str:  # type: ignore[override]  # read-only, as on real streams
        return "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return "replace"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if os.getpid() != self._pid:
            # A forked child: write to the descriptor, which the worker's fd capture reads.
            os.write(self._fileno, text.encode("utf-8", "replace"))
        else:
            self._capture.write(self._stream, text)
        return len(text)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # The real fd is redirected into the same capture, so C-level writers work too.
        return self._fileno


class _BinaryAdapter:
    """sys.stdout.buffer for code that writes bytes."""

    def __init__(self, text_stream: CaptureStream) -> None:
        self._text_stream = text_stream

    def write(self, data: bytes) -> int:
        self._text_stream.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        pass
