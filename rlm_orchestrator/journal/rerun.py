"""Running a recorded completion's code again in a fresh sandbox, and saying where it differs
(`rlm-orchestrator replay`: a regression check for prompt, sandbox image and library upgrades).

The sandbox starts as a completion's does (setup_code, then the context as `context_0` /
`context`), then every block runs in order with its sub-calls answered from the record: no
model is called, no key is needed. Unlike the rebuild of a lost sandbox (session.py), it does
not stop at the first divergence: each block is compared with its record (status, stdout,
stderr, requests not in the record) and the report lists them all; a block after a divergent
one may differ only because of it.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from rlm_orchestrator import answer_dict
from rlm_orchestrator.config.sandbox import SandboxConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.journal.recording import RecordedBlock, Recording
from rlm_orchestrator.journal.replay import BlockRecord, output_digest
from rlm_orchestrator.sandbox import ExecutionReport, SandboxSpec, SubCallOutcome, create_provider
from rlm_orchestrator.session import SessionState

SHOWN = 60  # characters of each side shown where an output differs


@dataclass(frozen=True)
class Difference:
    what: str  # "status" | "stdout" | "stderr" | "sub_call" | "sandbox"
    detail: str


@dataclass
class BlockOutcome:
    number: int  # the model's blocks counted from 1 in the order they ran; 0: internal code
    turn: int
    index: int  # within its turn, from 0
    internal: bool
    status: str  # now ("" when it did not run)
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def label(self) -> str:
        if self.internal:
            return "internal code (answer_dict)"
        return f"block {self.number} (turn {self.turn}, block {self.index + 1})"

    @property
    def diverged(self) -> bool:
        return bool(self.differences)


@dataclass
class ReplayReport:
    source: str
    environment: str
    blocks: list[BlockOutcome] = field(default_factory=list)

    @property
    def diverged(self) -> list[BlockOutcome]:
        return [b for b in self.blocks if b.diverged]

    def summary(self) -> str:
        ran = [b for b in self.blocks if not b.skipped]
        diverged = self.diverged
        skipped = len(self.blocks) - len(ran)
        tail = f", {skipped} not run (see above)" if skipped else ""
        if not diverged:
            return f"no divergence: {len(ran)} block(s) replayed the same{tail}"
        return (
            f"divergence: {len(diverged)} of {len(ran)} block(s) differ, the first at "
            f"{diverged[0].label}{tail}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "environment": self.environment,
            "diverged": bool(self.diverged),
            "summary": self.summary(),
            "blocks": [{**asdict(b), "label": b.label} for b in self.blocks],
        }


async def _ignore_output(stream: str, text: str) -> None:
    return None


async def _no_sub_calls(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
    return [SubCallOutcome(error="sub-calls are not available in setup_code")] * len(prompts)


def differences(record: BlockRecord, report: ExecutionReport) -> list[Difference]:
    """How a block's run differs from its record: status, and each output."""
    found = []
    if report.status != record.status:
        found.append(Difference("status", f"{record.status!r} then, {report.status!r} now"))
    for stream, digest, start, now in (
        ("stdout", record.stdout, record.stdout_start, report.stdout),
        ("stderr", record.stderr, record.stderr_start, report.stderr),
    ):
        if output_digest(now) != digest:
            found.append(Difference(stream, _where(start, now, digest)))
    return found


def _where(then: str, now: str, digest: str) -> str:
    """Where two outputs part (`then` may be only the start of the recorded one)."""
    length = int(digest.split(":", 1)[0])
    at = next((i for i, (a, b) in enumerate(zip(then, now, strict=False)) if a != b), None)
    if at is None:
        if len(then) < length and len(now) >= len(then):
            return f"past its first {len(then)} characters (recorded: {length}, now {len(now)})"
        at = min(len(then), len(now))
    return (
        f"at character {at}: {then[at : at + SHOWN]!r} then, {now[at : at + SHOWN]!r} now "
        f"({length} characters then, {len(now)} now)"
    )


async def rerun(
    recording: Recording, config: SandboxConfig, setup_code: str | None, context: Any
) -> ReplayReport:
    """Replay `recording` in one fresh sandbox of `config`'s backend (released at the end,
    whatever happens), with `context` loaded as a completion's."""
    report = ReplayReport(recording.source, config.backend.type)
    provider = create_provider(config.backend)
    try:
        sandbox = await provider.acquire(SandboxSpec.of(uuid.uuid4().hex, config.limits))
        try:
            client = sandbox.client
            if setup_code:
                await client.execute(
                    setup_code, on_output=_ignore_output, on_sub_call=_no_sub_calls
                )
            session = SessionState(sandbox)
            await session.add_context(context)
            if recording.answer_dict:
                await answer_dict.install(client)
            await _blocks(recording, config, session, report)
        finally:
            await provider.release(sandbox)
    finally:
        await provider.aclose()
    return report


async def _blocks(
    recording: Recording, config: SandboxConfig, session: SessionState, report: ReplayReport
) -> None:
    number = 0
    lost: str | None = None
    for block in recording.blocks:
        internal = block.record.internal
        if not internal:
            number += 1
        outcome = BlockOutcome(number if not internal else 0, block.turn, block.index, internal, "")
        report.blocks.append(outcome)
        if lost is not None:
            outcome.skipped = f"not run: the sandbox was lost at {lost}"
        elif block.skip:
            outcome.skipped = f"not run: {block.skip}"
        else:
            try:
                await _run(block, recording, config, session, outcome)
            except SandboxError as exc:
                outcome.differences.append(Difference("sandbox", f"the sandbox was lost: {exc}"))
                lost = outcome.label


async def _run(
    block: RecordedBlock,
    recording: Recording,
    config: SandboxConfig,
    session: SessionState,
    outcome: BlockOutcome,
) -> None:
    served = block.answers()
    client = session.sandbox.client
    ran = await client.execute(
        block.record.code,
        on_output=_ignore_output,
        on_sub_call=served,
        timeout_seconds=config.limits.exec_timeout_seconds,
        max_output_chars=config.limits.max_output_chars,
    )
    outcome.status = ran.status
    outcome.differences += differences(block.record, ran)
    outcome.differences += [Difference("sub_call", missing) for missing in served.missing]
    if served.unused:
        outcome.notes.append(f"{served.unused} recorded sub-call answer(s) were not asked for")
    if recording.answer_dict and not block.record.internal:
        # What the loop runs after each block under answer_dict (not in a trajectory).
        await answer_dict.after_block(client, ran)
