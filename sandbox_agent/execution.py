"""Following one execution: the worker's frames, checked, counted and passed on.

Output is forwarded within the execution's allowance (coalesced into large messages) and the
rest dropped and counted; sub-call requests are forwarded within the bounds on what is in
flight, or refused at once; the DONE frame is checked. A frame a legitimate worker never sends
makes the worker fail (it is killed; the executor reports it and starts a new one).
"""

from __future__ import annotations

import functools
import itertools
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sandbox_agent.frames import Kind, encode_json
from sandbox_agent.inbox import Inbox
from sandbox_agent.ledger import COALESCE_CHARS, REFUSED_TOO_MANY, ExecutionLedger
from sandbox_agent.limits import VALUE_CHUNK_CHARS
from sandbox_agent.protocol import (
    DoneFrame,
    LlmRequestFrame,
    ProtocolError,
    VariableHeaderFrame,
    kind_name,
    output_text,
    parse_done,
    parse_llm_request,
    parse_variable_header,
    value_chunk,
)

OUTPUT_KINDS = (Kind.STDOUT, Kind.STDERR)
# Replies to the agent's commands (DONE aside: an execution is never abandoned half-way).
REPLY_KINDS = (Kind.READY, Kind.LOADED, Kind.VARIABLE, Kind.CHUNK)
PROTOCOL_BROKEN = "the sandbox broke its protocol"
OUTSIDE_EXECUTION = "Error: llm_query was called outside of a running execution"
T = TypeVar("T")


@dataclass
class ExecutionOutcome:
    status: str  # ok | error | timeout | worker_died | cancelled
    error: str = ""
    stdout_chars: int = 0
    stderr_chars: int = 0
    truncated_chars: int = 0
    variables: list[tuple[str, str]] = field(default_factory=list)
    variables_omitted: int = 0
    duration: float = 0.0
    # len() of the answer FINAL_VAR gave in the code; its text is read with read_variable.
    final_answer_chars: int | None = None
    worker_restarted: bool = False


class WorkerError(Exception):
    """The worker could not do what was asked (it died, or refused the request)."""


class ExecutionSink(Protocol):
    """Where an execution's output and sub-LM requests go (the gRPC stream, in the agent)."""

    async def output(self, stream: int, text: str) -> None: ...

    async def llm_request(
        self, request_id: int, prompts: list[str], model: str, kind: str
    ) -> None: ...


class Replies:
    """The replies a worker owes, in the order their commands were sent. A caller that gave
    up (cancelled) leaves its ticket behind: its reply, when it comes, is dropped rather than
    taken for the next caller's, and a reply nobody asked for breaks the protocol."""

    def __init__(self) -> None:
        self._owed: deque[tuple[int, int]] = deque()
        self._tickets = itertools.count()

    def expect(self, kind: int) -> int:
        ticket = next(self._tickets)
        self._owed.append((ticket, kind))
        return ticket

    def settle(self, kind: int) -> int:
        """The ticket a reply of `kind` answers."""
        if not self._owed or self._owed[0][1] != kind:
            raise ProtocolError(f"it sent a {kind_name(kind)} frame that was not due")
        return self._owed.popleft()[0]


class WorkerLink(Protocol):
    """What following an execution needs of the worker process."""

    inbox: Inbox
    violation: str | None
    replies: Replies

    async def wait(self) -> int: ...

    def fail(self, violation: str) -> None: ...

    def send(self, data: bytes) -> None: ...


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped responding"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"was killed by signal {name}{hint}"
    return f"exited with code {returncode}"


def refusal(request_id: int, count: int, error: str) -> bytes:
    """The answer to a request that is not forwarded: one error string per prompt."""
    return encode_json(Kind.LLM_RESPONSE, {"id": request_id, "results": [error] * count})


async def follow(
    worker: WorkerLink, sink: ExecutionSink, ledger: ExecutionLedger
) -> DoneFrame | None:
    """Forward the execution's frames until its DONE; None when the worker is gone (it died,
    or broke the protocol: `worker.violation` says how). The time limit is the caller's (a
    timer that interrupts the code, whose kill timer then bounds the wait)."""
    while True:
        frame = await worker.inbox.get()
        if frame is None:
            await forward_output(ledger, sink)
            return None
        if worker.violation is not None:
            continue  # killed: drain what was read until the inbox ends
        kind, payload = frame
        try:
            if kind in OUTPUT_KINDS:
                ledger.add_output(kind, output_text(payload))
                if (flood := ledger.flood()) is not None:
                    raise ProtocolError(flood)
                # Coalesce: forward once nothing more is waiting, or once enough is.
                if not worker.inbox.has_frame() or ledger.buffered_chars >= COALESCE_CHARS:
                    await forward_output(ledger, sink)
                continue
            await forward_output(ledger, sink)
            if kind == Kind.LLM_REQUEST:
                await _forward_request(worker, sink, ledger, parse_llm_request(payload))
            elif kind == Kind.DONE:
                return parse_done(payload)
            elif kind in REPLY_KINDS:
                worker.replies.settle(kind)  # late, for a caller that gave up: dropped
            else:
                raise ProtocolError(f"it sent a {kind_name(kind)} frame during an execution")
        except ProtocolError as exc:
            worker.fail(str(exc))


async def forward_output(ledger: ExecutionLedger, sink: ExecutionSink) -> None:
    for stream, text in ledger.take_output():
        await sink.output(stream, text)


async def _forward_request(
    worker: WorkerLink, sink: ExecutionSink, ledger: ExecutionLedger, request: LlmRequestFrame
) -> None:
    if not ledger.admit_request(request):
        # Never forwarded: the orchestrator holds a bounded number of sub-calls.
        worker.send(refusal(request.request_id, len(request.prompts), REFUSED_TOO_MANY))
        return
    await sink.llm_request(request.request_id, request.prompts, request.model, request.kind)


async def ask(worker: WorkerLink, command: bytes, expected: int, parse: Callable[[bytes], T]) -> T:
    """Send a command and wait for its reply (see `reply`)."""
    ticket = worker.replies.expect(expected)
    worker.send(command)
    return await reply(worker, ticket, parse)


async def reply(worker: WorkerLink, ticket: int, parse: Callable[[bytes], T]) -> T:
    """The reply that settles `ticket`, parsed; WorkerError when the worker is gone. Output of
    background threads is dropped and their sub-calls refused; any other frame breaks the
    protocol."""
    while True:
        frame = await worker.inbox.get()
        if frame is None:
            returncode = await worker.wait()
            if worker.violation is not None:
                raise WorkerError(f"{PROTOCOL_BROKEN}: {worker.violation}")
            raise WorkerError(f"the sandbox worker {describe_exit(returncode)}")
        if worker.violation is not None:
            continue  # killed: drain what was read until the inbox ends
        kind, payload = frame
        try:
            if kind in REPLY_KINDS:
                if worker.replies.settle(kind) == ticket:
                    return parse(payload)
            elif kind == Kind.LLM_REQUEST:
                request = parse_llm_request(payload)
                worker.send(refusal(request.request_id, len(request.prompts), OUTSIDE_EXECUTION))
            elif kind not in OUTPUT_KINDS:
                raise ProtocolError(f"it sent a {kind_name(kind)} frame outside of an execution")
        except ProtocolError as exc:
            worker.fail(str(exc))


async def read_value(
    worker: WorkerLink,
    name: str,
    final_answer: bool,
    max_chars: int,
    *,
    on_header: Callable[[VariableHeaderFrame], Awaitable[None]],
    on_chunk: Callable[[str], Awaitable[None]],
) -> None:
    """str() of a variable (or of the answer FINAL_VAR gave in the last execution): its header,
    then its text in chunks pulled one by one from the worker, so that neither the pipe nor a
    gRPC message ever holds a whole big value. Nothing follows the header when the value is
    longer than max_chars."""
    get = encode_json(Kind.GET_VARIABLE, {"name": name, "final": final_answer})
    header = await ask(worker, get, Kind.VARIABLE, parse_variable_header)
    await on_header(header)
    if not header.found or header.chars > max_chars:
        return
    offset = 0
    while offset < header.chars:
        wanted = min(VALUE_CHUNK_CHARS, header.chars - offset)
        read = encode_json(Kind.READ_CHUNK, {"offset": offset, "chars": wanted})
        parse = functools.partial(value_chunk, expected_chars=wanted)
        await on_chunk(await ask(worker, read, Kind.CHUNK, parse))
        offset += wanted
