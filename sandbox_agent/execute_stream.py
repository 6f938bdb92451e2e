"""One Execute call: code blocks run one after another, each started by an ExecuteStart.

A new gRPC call costs about twice a message round trip on the same stream, so the
orchestrator keeps one Execute stream open per sandbox (see sandbox.proto). Each block is
accounted on its own: the executor gives every execution a fresh ledger, and an answer reaches
the worker only while this stream's block runs.

One task reads the stream (sub-call answers, the next start, the half-close): the answers of a
running block must get through while it waits for them. Each block runs in a task of its own,
started by that reader; the handler only waits for the end (and stops the running block when
the call is cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import grpc

from rlm_wire.status import FailedPrecondition, InvalidArgument, abort
from rlm_wire.v1 import sandbox_pb2 as pb
from sandbox_agent.executor import ExecutionOutcome, Executor
from sandbox_agent.frames import Kind
from sandbox_agent.namespace import LLM_QUERY
from sandbox_agent.tracing import ExecutionSpan

BUSY_POLLS, BUSY_POLL_SECONDS = 50, 0.01
_STATUS = {
    "ok": pb.EXECUTION_STATUS_OK,
    "error": pb.EXECUTION_STATUS_ERROR,
    "timeout": pb.EXECUTION_STATUS_TIMEOUT,
    "worker_died": pb.EXECUTION_STATUS_WORKER_DIED,
    "cancelled": pb.EXECUTION_STATUS_CANCELLED,
}
_STDOUT = pb.OUTPUT_STREAM_STDOUT
_STDERR = pb.OUTPUT_STREAM_STDERR
Context: TypeAlias = "grpc.aio.ServicerContext[pb.ExecuteRequest, pb.ExecuteResponse]"


class _StreamSink:
    """Writes an execution's events to its gRPC stream; goes quiet once the stream is gone."""

    def __init__(self, context: Context, traceparent: str = "") -> None:
        self._context = context
        self._traceparent = traceparent
        self.closed = False

    async def write(self, message: pb.ExecuteResponse) -> None:
        if self.closed:
            return
        try:
            await self._context.write(message)
        except Exception:  # the client went away; the execution is being interrupted
            self.closed = True

    async def output(self, stream: int, text: str) -> None:
        which = _STDOUT if stream == Kind.STDOUT else _STDERR
        await self.write(pb.ExecuteResponse(output=pb.OutputChunk(stream=which, text=text)))

    async def llm_request(self, request_id: int, prompts: list[str], model: str, kind: str) -> None:
        kind_pb = (
            pb.LLM_REQUEST_KIND_LLM_QUERY if kind == LLM_QUERY else pb.LLM_REQUEST_KIND_RLM_QUERY
        )
        request = pb.LlmRequest(
            request_id=request_id,
            prompts=prompts,
            model=model,
            kind=kind_pb,
            traceparent=self._traceparent,
        )
        await self.write(pb.ExecuteResponse(llm_request=request))


def result_message(outcome: ExecutionOutcome) -> pb.ExecuteResult:
    result = pb.ExecuteResult(
        status=_STATUS[outcome.status],
        error=outcome.error,
        stdout_chars=outcome.stdout_chars,
        stderr_chars=outcome.stderr_chars,
        truncated_chars=outcome.truncated_chars,
        variables=[pb.Variable(name=n, type_name=t) for n, t in outcome.variables],
        variables_omitted=outcome.variables_omitted,
        duration_seconds=outcome.duration,
        worker_restarted=outcome.worker_restarted,
        stream_open=True,
    )
    if outcome.final_answer_chars is not None:
        result.final_answer_chars = outcome.final_answer_chars
    return result


class ExecuteStream:
    """Serves one Execute call until the client half-closes, cancels, or breaks the protocol."""

    def __init__(
        self,
        executor: Executor,
        requests: AsyncIterator[pb.ExecuteRequest],
        context: Context,
        require_lease: Callable[[Context], None],
    ) -> None:
        self._executor = executor
        self._requests = requests
        self._context = context
        self._require_lease = require_lease
        # The task of the current (or last) block: it runs the code and writes the result.
        self._block: asyncio.Task[bool] | None = None
        # Its code runs in the executor now: answers go to the worker, a half-close stops it.
        self._executing = False
        self._sink: _StreamSink | None = None
        # From a start until its result is on its way: another start then breaks the protocol.
        self._in_block = False
        self._reader: asyncio.Task[None] | None = None
        self._reader_ended = False
        self._ending = False  # the agent is stopping (end_if_idle)
        # The handler's end: None, or what a block raised (a refusal with its status).
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve(self) -> None:
        first = await anext(self._requests, None)
        if first is None or first.WhichOneof("kind") != "start":
            raise InvalidArgument("the first message must be `start`")
        self._in_block = True
        self._start_block(first.start)
        # After the block's task, which runs first: a half-close right after the first start
        # must find its code running (and interrupt it).
        self._reader = asyncio.create_task(self._read(), name="execute-requests")
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            # The orchestrator cancelled the call: stop the code, but let the executor finish
            # its bookkeeping (it is bounded by the interrupt grace and a kill).
            if self._executing:
                self._executor.interrupt("cancelled")
            if self._sink is not None:
                self._sink.closed = True
            if self._block is not None:
                with contextlib.suppress(Exception):
                    await self._block
            raise
        finally:
            self._reader.cancel()

    def end_if_idle(self) -> None:
        """At shutdown: end the stream (OK) once no block is in progress on it. A block whose
        result is already sent may still be finishing its task: the stream ends with it."""
        self._ending = True
        idle = not self._in_block and (self._block is None or self._block.done())
        if idle and not self._done.done():
            self._done.set_result(None)

    def _start_block(self, start: pb.ExecuteStart) -> None:
        # Blocks are started by the reader, without a hop through the handler's task.
        block = asyncio.create_task(self._run(start, self._block))
        block.add_done_callback(self._block_done)
        self._block = block

    def _block_done(self, block: asyncio.Task[bool]) -> None:
        if self._done.done():
            return
        if block.cancelled():
            self._done.set_result(None)
        elif (error := block.exception()) is not None:
            self._done.set_exception(error)
        elif not block.result() or self._reader_ended:
            self._done.set_result(None)  # the client is gone, or wants no more blocks
        elif self._ending and not self._in_block:
            self._done.set_result(None)  # the agent is stopping: no next block

    async def _read(self) -> None:
        """Answers go to the running block; a start begins the next one; the end stops the
        running one."""
        try:
            async for message in self._requests:
                kind = message.WhichOneof("kind")
                if kind == "llm_response":
                    if self._executing:  # a late answer of an ended block is dropped
                        self._deliver(message.llm_response)
                elif kind == "start":
                    if self._in_block:
                        early = "an ExecuteStart arrived before the running block's result"
                        await abort(self._context, InvalidArgument(early).status())
                    self._in_block = True
                    self._start_block(message.start)
        except (Exception, asyncio.CancelledError):  # aborted, failed, or the handler ended
            pass
        finally:
            self._reader_ended = True
            # The orchestrator half-closed before the result: it no longer wants this block.
            if self._executing:
                self._executor.interrupt("cancelled")
            if (self._block is None or self._block.done()) and not self._done.done():
                self._done.set_result(None)

    def _deliver(self, answer: pb.LlmResponse) -> None:
        texts = [
            r.text if r.WhichOneof("outcome") == "text" else f"Error: {r.error}"
            for r in answer.results
        ]
        self._executor.deliver_llm_response(answer.request_id, texts)

    async def _run(self, start: pb.ExecuteStart, previous: asyncio.Task[bool] | None) -> bool:
        """Run one block and send its result; False when the stream is gone."""
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # still writing its result: one write at a time
        self._require_lease(self._context)  # a stream outlives a released lease
        executor = self._executor
        # A cancelled execution may still be stopping: the next one waits for it (bounded by
        # the interrupt grace and a kill). A live one is a caller's bug: refuse.
        for _ in range(BUSY_POLLS):  # a cancel sent just before this call may still be in flight
            if not executor.busy or executor.stopping:
                break
            await asyncio.sleep(BUSY_POLL_SECONDS)
        if executor.busy and not executor.stopping:
            raise FailedPrecondition("another execution is running in this sandbox")
        span = ExecutionSpan.start(start.traceparent) if start.traceparent else None
        sink = self._sink = _StreamSink(self._context, span.traceparent if span else "")
        self._executing = True
        try:
            outcome = await executor.execute(
                start.code, sink, start.timeout_seconds, start.max_output_chars
            )
        finally:
            self._executing = False
        self._in_block = False  # the client may send the next start once it has the result
        result = result_message(outcome)
        if span is not None:
            attributes = {
                "rlm.exec.status": outcome.status,
                "rlm.exec.stdout_chars": str(outcome.stdout_chars),
                "rlm.exec.stderr_chars": str(outcome.stderr_chars),
                "rlm.exec.worker_restarted": str(outcome.worker_restarted).lower(),
                "rlm.exec.worker_pid": str(executor.worker_pid),
            }
            error = (
                outcome.error.splitlines()[-1] if outcome.status != "ok" and outcome.error else ""
            )
            result.span.CopyFrom(span.finish(attributes, error))
        await sink.write(pb.ExecuteResponse(result=result))
        return not sink.closed
