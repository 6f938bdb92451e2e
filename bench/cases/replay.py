"""Replay: the time to rebuild a lost sandbox's namespace of a 20-block session (issue 20).

A session in a local sandbox loads a context and runs 20 blocks, each making one sub-call
(answered by a stub, recorded) and building variables from it; then a fresh sandbox is rebuilt
from those steps (`SessionState.recover`: the context loaded again, the 20 blocks run again with
their recorded answers, each output compared with the record). The row is the rebuild's wall
time, the new sandbox's start excluded (that is the `acquire` rows'). No target: the issue asks
for the figure.
"""

from __future__ import annotations

import time

from bench.common import Metric, timing
from rlm_orchestrator.journal.replay import BlockRecord, SubCallRecord
from rlm_orchestrator.sandbox import Sandbox, SandboxSpec, SubCallOutcome
from rlm_orchestrator.sandbox.execution_stream import SubCallHandler
from rlm_orchestrator.sandbox.local import LocalProvider
from rlm_orchestrator.session import SessionState

NAME = "replay"
DESCRIPTION = "rebuilding a lost local sandbox's namespace of a 20-block session by replay"
BLOCKS, ROUNDS = 20, 5
CONTEXT = "lorem ipsum " * 20_000


def _code(index: int) -> str:
    return (
        f"part_{index} = llm_query('summarise part {index}')\n"
        f"words_{index} = len(context.split()) + len(part_{index})\n"
        f"print('block {index}', words_{index})"
    )


async def _ignore(stream: str, text: str) -> None:
    return None


async def _answer(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
    return [SubCallOutcome(text=f"summary of {p}") for p in prompts]


def _recording(record: BlockRecord) -> SubCallHandler:
    async def answer(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
        answers = await _answer(prompts, model, kind)
        record.sub_calls.append(SubCallRecord.of(prompts, model, kind, answers))
        return answers

    return answer


async def _session(provider: LocalProvider, label: str) -> SessionState:
    sandbox = await provider.acquire(SandboxSpec(session_id=label))
    session = SessionState(sandbox)
    await session.add_context(CONTEXT)
    for index in range(BLOCKS):
        record = BlockRecord(_code(index))
        report = await sandbox.client.execute(
            record.code, on_output=_ignore, on_sub_call=_recording(record)
        )
        session.record(record.finish(report), report.worker_restarted)
    return session


async def _rebuild(provider: LocalProvider, session: SessionState, label: str) -> float:
    """Seconds from the new sandbox's start (excluded) to the namespace rebuilt."""
    started: list[float] = []

    async def replace(lost: Sandbox) -> Sandbox:
        await provider.release(lost)
        fresh = await provider.acquire(SandboxSpec(session_id=label))
        started.append(time.perf_counter())
        return fresh

    session.replace = replace
    divergence = await session.recover(30.0, 100_000)
    assert divergence is None, divergence
    return time.perf_counter() - started[0]


async def run() -> list[Metric]:
    provider = LocalProvider()
    seconds: list[float] = []
    try:
        for round_ in range(ROUNDS):
            session = await _session(provider, f"bench-replay-{round_}")
            seconds.append(await _rebuild(provider, session, f"bench-rebuilt-{round_}"))
            await provider.release(session.sandbox)
    finally:
        await provider.aclose()
    return [
        timing(NAME, f"rebuild of a {BLOCKS}-block session (sandbox start excluded)", seconds, "ms")
    ]
