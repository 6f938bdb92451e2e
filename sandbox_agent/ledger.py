"""What the agent lets one execution have, whatever its worker sends.

The worker caps its own output and waits for room before sending sub-call requests, but user
code can write frames to the pipe itself. The ledger is the agent's own count: output kept and
dropped per stream, and the sub-call requests in flight (forwarded to the orchestrator and
not answered yet). The agent's side of `limits.py`.
"""

from __future__ import annotations

from sandbox_agent.frames import Kind
from sandbox_agent.limits import (
    MAX_PENDING_PROMPT_BYTES,
    MAX_PENDING_PROMPTS,
    MAX_PENDING_REQUESTS,
    OUTPUT_MARKER_SLACK,
    OutputBudget,
)
from sandbox_agent.protocol import LlmRequestFrame, ProtocolError

# Output is forwarded in gRPC messages of up to this many characters: a worker sending many
# tiny frames costs the orchestrator a few large messages, not one per frame.
COALESCE_CHARS = 64 * 1024
REFUSED_TOO_MANY = (
    "Error: too many sub-calls in flight in this execution (at most "
    f"{MAX_PENDING_REQUESTS} requests, {MAX_PENDING_PROMPTS} prompts and "
    f"{MAX_PENDING_PROMPT_BYTES // (1024 * 1024)} MiB of prompts at a time); this one was not sent"
)
REFUSED_ENDED = "Error: the execution ended before this sub-call was answered"
MAX_REFUSED_REQUESTS = MAX_PENDING_REQUESTS


class ExecutionLedger:
    def __init__(self, max_output_chars: int) -> None:
        self.max_output_chars = max_output_chars
        self.output = OutputBudget(max_output_chars, OUTPUT_MARKER_SLACK)
        self._buffer: list[tuple[int, list[str]]] = []
        self.buffered_chars = 0
        self._in_flight: dict[int, LlmRequestFrame] = {}
        self._prompts = 0
        self._bytes = 0
        self.refused = 0

    # -- output ------------------------------------------------------------------------------

    def add_output(self, stream: int, text: str) -> None:
        """Count a chunk; what fits the allowance waits in the buffer to be forwarded."""
        kept = self.output.admit(stream, text)
        if not kept:
            return
        if self._buffer and self._buffer[-1][0] == stream:
            self._buffer[-1][1].append(kept)
        else:
            self._buffer.append((stream, [kept]))
        self.buffered_chars += len(kept)

    def take_output(self) -> list[tuple[int, str]]:
        """The buffered output, one piece per run of a stream, in order."""
        buffer, self._buffer, self.buffered_chars = self._buffer, [], 0
        return [(stream, "".join(parts)) for stream, parts in buffer]

    def flood(self) -> str | None:
        """Why the worker is judged to be flooding, or None."""
        if not self.output.flooding:
            return None
        return (
            f"it wrote {self.output.dropped_total} characters of output past its cap of "
            f"{self.max_output_chars} per stream, around its own output capture"
        )

    def drop_markers(self) -> list[tuple[int, str]]:
        return [
            (stream, marker)
            for stream in (Kind.STDOUT, Kind.STDERR)
            if (marker := self.output.marker(stream, "the sandbox agent"))
        ]

    # -- sub-call requests ----------------------------------------------------------------------

    def admit_request(self, request: LlmRequestFrame) -> bool:
        """True when the request may be forwarded; False when it must be refused at once."""
        if request.request_id in self._in_flight:
            raise ProtocolError(f"it reused the id {request.request_id} of a request in flight")
        if (
            len(self._in_flight) >= MAX_PENDING_REQUESTS
            or self._prompts + len(request.prompts) > MAX_PENDING_PROMPTS
            or self._bytes + request.size > MAX_PENDING_PROMPT_BYTES
        ):
            self.refused += 1
            if self.refused > MAX_REFUSED_REQUESTS:
                # The worker waits for room before it sends: one that keeps going past the
                # bound is not a legitimate worker, and its total is bounded here.
                raise ProtocolError(
                    f"it sent more than {MAX_REFUSED_REQUESTS} sub-calls past the bound on "
                    "those in flight"
                )
            return False
        self._in_flight[request.request_id] = request
        self._prompts += len(request.prompts)
        self._bytes += request.size
        return True

    def answered(self, request_id: int) -> bool:
        """Count an answer; False when no such request is in flight (nothing to deliver)."""
        request = self._in_flight.pop(request_id, None)
        if request is None:
            return False
        self._prompts -= len(request.prompts)
        self._bytes -= request.size
        return True

    def unanswered(self) -> list[tuple[int, int]]:
        """(id, prompt count) of every request still in flight, now forgotten."""
        left = [(i, len(r.prompts)) for i, r in self._in_flight.items()]
        self._in_flight.clear()
        self._prompts = self._bytes = 0
        return left
