"""One code block of the root model, run in the session's sandbox: its events, span, sub-calls,
the FINAL_VAR it may set, and what the model is shown of it.

When the sandbox is lost under the block and the session can move, the session moves to a new
sandbox (its contexts loaded again) and the block reports the loss to the model.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from opentelemetry.trace import Status, StatusCode

from rlm_orchestrator import answer_dict, telemetry
from rlm_orchestrator import events as ev
from rlm_orchestrator.answers import AnswerRead, read_answer
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.journal.recorder import CompletionJournal
from rlm_orchestrator.journal.replay import BlockRecord, RecordedSubCalls, SubCallRecord
from rlm_orchestrator.logged_values import read_values
from rlm_orchestrator.logger import RLMLogger
from rlm_orchestrator.parsing import format_execution_output, truncate_output
from rlm_orchestrator.sandbox import ExecutionReport, SubCallOutcome
from rlm_orchestrator.sandbox.execution_stream import SubCallHandler
from rlm_orchestrator.session import SessionState
from rlm_orchestrator.sub_calls import SubCalls
from rlm_orchestrator.types import REPLResult, RLMChatCompletion
from sandbox_agent.limits import cut_middle

if TYPE_CHECKING:
    from rlm_orchestrator.loop import LoopSettings

# Not listed as "REPL variables" to the model: what we loaded (it knows), and code.
_LOADED_NAME = re.compile(r"^(context|history)(_\d+)?$")
_CODE_TYPES = {"function", "type", "builtin_function_or_method", "method", "ABCMeta"}
MAX_SHOWN_ERROR_CHARS = 2_000


class BlockRunner:
    def __init__(
        self,
        settings: LoopSettings,
        session: SessionState,
        sub_calls: SubCalls,
        emit: ev.EventHandler,
        logger: RLMLogger | None,
        journal: CompletionJournal | None = None,
    ) -> None:
        self.settings = settings
        self.session = session
        self.sub_calls = sub_calls
        self.emit = emit
        self.logger = logger
        self.journal = journal

    def _count(self, answer: SubCallOutcome) -> None:
        """A sub-call answered from the journal: its cost counts again, as it was paid."""
        for model, usage in (answer.usage.model_usage_summaries if answer.usage else {}).items():
            self.sub_calls.tracker.record(model, usage)

    def shown(self, result: REPLResult) -> str:
        output = format_execution_output(result.stdout, result.stderr, result.variables)
        shown = truncate_output(output, self.settings.max_block_chars)
        if result.truncated_chars:
            # The cut in the sandbox may sit past what the model sees: say it happened.
            shown += (
                f"\n[the sandbox also dropped {result.truncated_chars} characters from the "
                "middle of this block's output]"
            )
        if result.status != "ok" and result.error and result.error not in shown:
            # How the block ended sits at the end of stderr, which a long output pushes out of
            # view (an output flood, for one): the model must still see it.
            shown += f"\n[the block ended with: {cut_middle(result.error, MAX_SHOWN_ERROR_CHARS)}]"
        return shown

    async def _read_answer(self, name: str | None) -> AnswerRead:
        return await read_answer(self.session.sandbox.client, name, self.settings.max_answer_chars)

    async def run(self, iteration: int, index: int, code: str) -> tuple[REPLResult, str | None]:
        """Run one block; with what the model must be told about its FINAL_VAR, if anything."""
        depth, turn = self.settings.depth, iteration + 1  # events count turns from 1
        self.emit(ev.CodeBlockStarted(depth, turn, index, code))
        calls: list[RLMChatCompletion] = []

        async def on_output(stream: str, text: str) -> None:
            self.emit(ev.OutputChunk(depth, turn, index, stream, text))

        record = BlockRecord(code)

        async def live(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
            answers = await self.sub_calls.answer(prompts, model, kind, calls)
            if self.journal is not None:
                sub_call = SubCallRecord.of(prompts, model, kind, answers)
                await self.journal.sub_call(turn, index, sub_call)
            return answers

        first: SubCallHandler = live
        if self.journal is not None and (done := self.journal.recorded_sub_calls(turn, index)):
            first = RecordedSubCalls(done, live=live, on_served=self._count)

        def recorded(handler: SubCallHandler) -> SubCallHandler:
            async def answer(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
                answers = list(await handler(prompts, model, kind))
                record.sub_calls.append(SubCallRecord.of(prompts, model, kind, answers))
                return answers

            return answer

        attributes = {"rlm.depth": depth, "rlm.iteration": iteration, "rlm.block": index}
        with telemetry.tracer().start_as_current_span("rlm.execute", attributes=attributes) as span:
            if telemetry.record_content():
                span.set_attribute("rlm.code", telemetry.content(code))
            limits = self.settings.sandbox

            async def execute(handler: SubCallHandler) -> ExecutionReport:
                return await self.session.sandbox.client.execute(
                    code,
                    on_output=on_output,
                    on_sub_call=recorded(handler),
                    timeout_seconds=limits.exec_timeout_seconds,
                    max_output_chars=limits.max_output_chars,
                    execution_id=f"{iteration}.{index}",
                    traceparent=telemetry.traceparent(span),
                )

            try:
                report = await execute(first)
            except SandboxError as exc:
                if self.session.replace is None:
                    raise
                report = await self._rebuilt(exc, record, execute, live)
            span.set_attribute("rlm.exec.status", report.status)
            if report.status != "ok":
                last_line = (report.error.strip().splitlines() or [report.status])[-1]
                span.set_status(Status(StatusCode.ERROR, last_line))
            if telemetry.record_content():
                span.set_attribute("rlm.output", telemetry.content(report.stdout + report.stderr))
        if report.agent_span is not None:
            telemetry.export_agent_span(report.agent_span)
        if report.status != "sandbox_lost":
            self.session.record(record.finish(report), report.worker_restarted)
            if self.journal is not None:
                await self.journal.block(turn, index, record)
        if not self.settings.final_in_text:
            report, rewrap = await answer_dict.after_block(self.session.sandbox.client, report)
            if rewrap is not None:
                internal = BlockRecord(answer_dict.REWRAP_CODE, internal=True).finish(rewrap)
                self.session.record(internal, rewrap.worker_restarted)
        read = AnswerRead()
        if report.final_answer_chars is not None:
            read = await self._read_answer(None)
        result = REPLResult(
            stdout=report.stdout,
            stderr=report.stderr,
            variables=[
                name
                for name, type_name in report.variables
                if type_name not in _CODE_TYPES and not _LOADED_NAME.match(name)
            ],
            execution_time=report.duration,
            status=report.status,
            error=report.error,
            truncated_chars=report.truncated_chars,
            final_answer=read.text,
            worker_restarted=report.worker_restarted,
            rlm_calls=calls,
        )
        if self.logger is not None:  # the original logs the values: read them back
            result.locals = await read_values(self.session.sandbox.client, result.variables)
        self.emit(ev.CodeBlockFinished(depth, turn, index, result))
        return result, read.note or None

    async def _rebuilt(
        self,
        lost: SandboxError,
        record: BlockRecord,
        execute: Callable[[SubCallHandler], Awaitable[ExecutionReport]],
        live: SubCallHandler,
    ) -> ExecutionReport:
        """The sandbox died or was cut off under the block: a new one, the namespace rebuilt
        by replay, and the block run again there (its sub-calls answered so far served from the
        record), the model told nothing. When the replay diverges, or the block loses its
        sandbox a second time (code that kills its own agent), the session goes on in a new
        sandbox and the model is told what was lost."""
        limits = self.settings.sandbox
        recover = functools.partial(
            self.session.recover, limits.exec_timeout_seconds, limits.max_output_chars
        )
        divergence = await recover()
        if divergence is not None:
            return _lost(
                lost,
                f"rebuilding your variables by running your code again diverged at {divergence} "
                "(code that reads the clock, randomness or changing files does that): variables "
                "set from there on may be missing or differ",
            )
        answered, record.sub_calls = record.sub_calls, []
        try:
            return await execute(RecordedSubCalls(answered, live=live))
        except SandboxError as again:
            divergence = await recover()
            rebuilt = "rebuilt" if divergence is None else f"rebuilt up to {divergence}"
            return _lost(
                again,
                "this block lost its sandbox twice (run again after the first loss), so it was "
                f"not run a third time; the variables from before it were {rebuilt}",
            )


def _lost(lost: SandboxError, what: str) -> ExecutionReport:
    message = (
        f"SandboxError: {lost}. The session moved to a new sandbox and the contexts were loaded "
        f"again, but {what}."
    )
    return ExecutionReport(
        status="sandbox_lost",
        stdout="",
        stderr=message + "\n",
        error=message,
        worker_restarted=True,
    )
