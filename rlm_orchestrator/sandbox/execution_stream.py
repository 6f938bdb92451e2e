"""One Execute stream as the orchestrator receives it, bounded: the agent is not trusted.

In Docker, user code runs as the agent's own uid, so what comes from an agent is held to the
same numbers the agent holds its worker to (`sandbox_agent.limits`): output kept per stream
(the cap plus room for markers; the rest dropped, counted and announced), sub-calls in flight,
the result's fields. An agent that goes on sending output far past the cap, or more sub-calls
than an honest agent lets through, is given up on (SandboxError: the loop moves the session
to a new sandbox).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import context as otel_context

from rlm_orchestrator import telemetry
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.types import UsageSummary
from rlm_wire.v1 import sandbox_pb2 as pb
from sandbox_agent.limits import (
    DEFAULT_MAX_OUTPUT_CHARS,
    MAX_ERROR_CHARS,
    MAX_NAME_CHARS,
    MAX_PENDING_PROMPTS,
    MAX_PENDING_REQUESTS,
    MAX_PROMPTS_PER_REQUEST,
    MAX_VARIABLES,
    ORCHESTRATOR_OUTPUT_SLACK,
    OutputBudget,
    cut_middle,
)

STDOUT, STDERR = "stdout", "stderr"
_STREAM_IDS = {STDOUT: pb.OUTPUT_STREAM_STDOUT, STDERR: pb.OUTPUT_STREAM_STDERR}
_STATUS_NAMES = {
    pb.EXECUTION_STATUS_OK: "ok",
    pb.EXECUTION_STATUS_ERROR: "error",
    pb.EXECUTION_STATUS_TIMEOUT: "timeout",
    pb.EXECUTION_STATUS_WORKER_DIED: "worker_died",
    pb.EXECUTION_STATUS_CANCELLED: "cancelled",
}


@dataclass
class SubCallOutcome:
    """The answer to one prompt of a sub-LM request: text, or an error message."""

    text: str | None = None
    error: str | None = None
    # What the answer cost (the model's call, or a child RLM's whole tree); None: nothing paid.
    usage: UsageSummary | None = field(default=None, compare=False, repr=False)


OutputHandler = Callable[[str, str], Awaitable[None]]
# (prompts, model or "", kind "llm_query" | "rlm_query") -> one outcome per prompt, in order.
SubCallHandler = Callable[[list[str], str, str], Awaitable[Sequence[SubCallOutcome]]]


@dataclass
class ExecutionReport:
    """An execution as the orchestrator saw it: output gathered from the stream + summary."""

    status: str
    stdout: str
    stderr: str
    error: str
    variables: list[tuple[str, str]] = field(default_factory=list)
    duration: float = 0.0
    truncated_chars: int = 0
    # Set when the code called FINAL_VAR: the answer's length. Read it with
    # AgentClient.get_variable(final_answer=True).
    final_answer_chars: int | None = None
    worker_restarted: bool = False
    # User variables the agent did not list (past its bounds).
    variables_omitted: int = 0
    # The agent's span of this execution (when traced), for the orchestrator to export.
    agent_span: pb.AgentSpan | None = None


def _broken(what: str) -> SandboxError:
    return SandboxError(f"the sandbox agent broke its protocol: {what}")


class ExecutionStream:
    """Takes an Execute stream's messages one by one; answers go to `send`."""

    def __init__(
        self,
        max_output_chars: int,
        on_output: OutputHandler,
        on_sub_call: SubCallHandler,
        send: Callable[[pb.ExecuteRequest], None],
    ) -> None:
        self._budget = OutputBudget(
            max_output_chars or DEFAULT_MAX_OUTPUT_CHARS, ORCHESTRATOR_OUTPUT_SLACK
        )
        self._output: dict[str, list[str]] = {STDOUT: [], STDERR: []}
        self._on_output = on_output
        self._on_sub_call = on_sub_call
        self._send = send
        self._sub_calls: set[asyncio.Task[None]] = set()
        self._prompts_in_flight = 0

    async def receive(self, message: pb.ExecuteResponse) -> pb.ExecuteResult | None:
        """Handle one message; the result when it is the last one."""
        kind = message.WhichOneof("kind")
        if kind == "output":
            await self._take_output(message.output)
        elif kind == "llm_request":
            self._start_sub_call(message.llm_request)
        elif kind == "result":
            return message.result
        return None

    async def _take_output(self, chunk: pb.OutputChunk) -> None:
        stream = STDOUT if chunk.stream == pb.OUTPUT_STREAM_STDOUT else STDERR
        kept = self._budget.admit(_STREAM_IDS[stream], chunk.text)
        if self._budget.flooding:
            raise _broken(f"it sent {self._budget.dropped_total} characters of output past the cap")
        if kept:
            self._output[stream].append(kept)
            await self._on_output(stream, kept)

    def _start_sub_call(self, request: pb.LlmRequest) -> None:
        count = len(request.prompts)
        # An honest agent holds its worker to the same bounds (and counts an answer as given
        # later than we do): going past them is a protocol violation, not a busy moment.
        if not 1 <= count <= MAX_PROMPTS_PER_REQUEST:
            raise _broken(f"it sent a request of {count} prompts")
        if (
            len(self._sub_calls) >= MAX_PENDING_REQUESTS
            or self._prompts_in_flight + count > MAX_PENDING_PROMPTS
        ):
            raise _broken(
                f"it sent more than {MAX_PENDING_REQUESTS} requests or {MAX_PENDING_PROMPTS} "
                "prompts in flight"
            )
        task = asyncio.create_task(self._answer(request))
        self._sub_calls.add(task)
        self._prompts_in_flight += count
        task.add_done_callback(lambda done: self._sub_call_done(done, count))

    def _sub_call_done(self, task: asyncio.Task[None], prompts: int) -> None:
        self._sub_calls.discard(task)
        self._prompts_in_flight -= prompts

    def _reply(self, request_id: int, results: list[pb.LlmResult]) -> None:
        response = pb.LlmResponse(request_id=request_id, results=results)
        self._send(pb.ExecuteRequest(llm_response=response))

    async def _answer(self, request: pb.LlmRequest) -> None:
        kind = "rlm_query" if request.kind == pb.LLM_REQUEST_KIND_RLM_QUERY else "llm_query"
        # Sub-call spans are children of the agent's execution span (this task only).
        parent = telemetry.context_from(request.traceparent)
        token = otel_context.attach(parent) if parent is not None else None
        try:
            outcomes = await self._on_sub_call(list(request.prompts), request.model, kind)
        finally:
            if token is not None:
                otel_context.detach(token)
        self._reply(
            request.request_id,
            [
                pb.LlmResult(error=o.error)
                if o.error is not None
                else pb.LlmResult(text=o.text or "")
                for o in outcomes
            ],
        )

    async def close(self) -> None:
        """Cancel the sub-calls still running (the execution is over, one way or another)."""
        for task in self._sub_calls:
            task.cancel()
        for task in list(self._sub_calls):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def report(self, result: pb.ExecuteResult) -> ExecutionReport:
        for stream, stream_id in _STREAM_IDS.items():
            if marker := self._budget.marker(stream_id, "the orchestrator"):
                self._output[stream].append(marker)
                await self._on_output(stream, marker)
        variables = [
            (v.name, v.type_name[:MAX_NAME_CHARS])
            for v in result.variables[:MAX_VARIABLES]
            if len(v.name) <= MAX_NAME_CHARS
        ]
        return ExecutionReport(
            status=_STATUS_NAMES.get(result.status, "error"),
            stdout="".join(self._output[STDOUT]),
            stderr="".join(self._output[STDERR]),
            error=cut_middle(result.error, MAX_ERROR_CHARS + ORCHESTRATOR_OUTPUT_SLACK),
            variables=variables,
            duration=result.duration_seconds,
            truncated_chars=result.truncated_chars + self._budget.dropped_total,
            final_answer_chars=(
                result.final_answer_chars if result.HasField("final_answer_chars") else None
            ),
            worker_restarted=result.worker_restarted,
            variables_omitted=result.variables_omitted + len(result.variables) - len(variables),
            agent_span=result.span if result.HasField("span") else None,
        )
