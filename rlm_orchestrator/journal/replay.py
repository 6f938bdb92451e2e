"""Rebuilding a REPL namespace by running its code again with the answers it received.

A namespace is a function of what went into it: the values loaded (contexts, histories), the
code blocks in order, and the answers of the sub-calls each block made. Run the same blocks in a
fresh sandbox, serve each sub-call its recorded answer (no model call, no cost), and the
namespace is the same, unless the code read something else: the clock, randomness, the network
(none in a sandbox), files that changed, object addresses. That shows as a divergence: an
output, a status or a sub-call request that differs from the record. Replay stops at the first
one and says where; the caller falls back to telling the model what was lost.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rlm_orchestrator.sandbox import ExecutionReport, SubCallOutcome
from rlm_orchestrator.sandbox.execution_stream import SubCallHandler
from rlm_orchestrator.types import UsageSummary

MAX_SHOWN = 300
# The start of each output kept in a record, to say where a replay's output differs.
START = 400


def request_digest(prompts: Sequence[str], model: str, kind: str) -> str:
    """What identifies a sub-call request: its prompts, model and kind (hashed: prompts can be
    megabytes, and a record need not keep them)."""
    data = json.dumps([list(prompts), model, kind], ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8", "replace")).hexdigest()


@dataclass
class SubCallRecord:
    """One sub-call request of a block, and the answers it got, in the prompts' order."""

    digest: str
    model: str
    kind: str
    # (text, error) per prompt: exactly one is set.
    outcomes: list[tuple[str | None, str | None]]
    # What each answer cost (UsageSummary.to_dict(), None when nothing was paid): served from
    # the record, it is counted again, as it was paid.
    usage: list[dict[str, Any] | None] = field(default_factory=list)

    def answers(self) -> list[SubCallOutcome]:
        usage = self.usage or [None] * len(self.outcomes)
        return [
            SubCallOutcome(text, error, UsageSummary.from_dict(u) if u else None)
            for (text, error), u in zip(self.outcomes, usage, strict=False)
        ]

    @classmethod
    def of(
        cls, prompts: Sequence[str], model: str, kind: str, answers: Sequence[SubCallOutcome]
    ) -> SubCallRecord:
        outcomes = [(a.text, a.error) for a in answers]
        usage = [a.usage.to_dict() if a.usage is not None else None for a in answers]
        return cls(request_digest(prompts, model, kind), model, kind, outcomes, usage)


def output_digest(text: str) -> str:
    """What identifies an output (kept instead of the output: it may be megabytes)."""
    return f"{len(text)}:{hashlib.sha256(text.encode('utf-8', 'replace')).hexdigest()[:32]}"


@dataclass
class BlockRecord:
    """A block that ran in a namespace: its code, its sub-calls, what it printed (as digests,
    with the start of each output for messages), how it ended."""

    code: str
    sub_calls: list[SubCallRecord] = field(default_factory=list)
    stdout: str = ""  # output_digest
    stderr: str = ""
    stdout_start: str = ""
    stderr_start: str = ""
    status: str = "ok"
    # Internal code (answer_dict's) rather than the model's: replayed all the same.
    internal: bool = False

    def finish(self, report: ExecutionReport) -> BlockRecord:
        self.stdout, self.stderr = output_digest(report.stdout), output_digest(report.stderr)
        self.stdout_start, self.stderr_start = report.stdout[:START], report.stderr[:START]
        self.status = report.status
        return self

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> BlockRecord:
        calls = [
            SubCallRecord(
                c["digest"],
                c["model"],
                c["kind"],
                [(o[0], o[1]) for o in c["outcomes"]],
                c.get("usage") or [],
            )
            for c in payload.get("sub_calls", [])
        ]
        names = ("code", "stdout", "stderr", "stdout_start", "stderr_start", "status", "internal")
        return cls(sub_calls=calls, **{k: payload[k] for k in names})


@dataclass(frozen=True)
class Divergence:
    """Where a replay stopped matching its record (`block` counts from 0)."""

    block: int
    what: str  # "output" | "status" | "sub_call"
    detail: str

    def __str__(self) -> str:
        return f"block {self.block + 1}: {self.what} differs: {self.detail}"


class RecordedSubCalls:
    """A sub-call handler that answers from a record: a request is matched to an unused
    record with the same digest (concurrent requests may arrive in another order); a request
    with none is a divergence, answered by `live` when given (the rest of an interrupted block
    runs for real), else with an error."""

    def __init__(
        self,
        records: Sequence[SubCallRecord],
        live: SubCallHandler | None = None,
        on_served: Callable[[SubCallOutcome], None] | None = None,
    ):
        self._unused = list(records)
        self._live = live
        self._on_served = on_served
        self.divergence: str | None = None

    async def __call__(self, prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
        digest = request_digest(prompts, model, kind)
        for index, record in enumerate(self._unused):
            if record.digest == digest:
                del self._unused[index]
                answers = record.answers()
                if self._on_served is not None:
                    for answer in answers:
                        self._on_served(answer)
                return answers
        if self._live is not None:
            return list(await self._live(prompts, model, kind))
        self.divergence = f"a {kind} request not in the record ({_preview(prompts)})"
        return [SubCallOutcome(error="replay: this request was not made when the block ran")] * len(
            prompts
        )

    @property
    def unused(self) -> int:
        return len(self._unused)


def compare(index: int, record: BlockRecord, report: ExecutionReport) -> Divergence | None:
    """How a replayed block differs from its record, if it does."""
    if report.status != record.status:
        return Divergence(index, "status", f"{record.status!r} then, {report.status!r} now")
    for stream, digest, start, now in (
        ("stdout", record.stdout, record.stdout_start, report.stdout),
        ("stderr", record.stderr, record.stderr_start, report.stderr),
    ):
        if output_digest(now) != digest:
            detail = f"{stream}: {_first_difference(start, now[:START])}"
            return Divergence(index, "output", detail)
    return None


def _first_difference(then: str, now: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(then, now, strict=False)) if a != b), None)
    if at is None:
        return "it differs past its start"
    return f"at character {at}: {then[at : at + 40]!r} then, {now[at : at + 40]!r} now"


def _preview(prompts: Sequence[str]) -> str:
    text = prompts[0] if prompts else ""
    return (text[:MAX_SHOWN] + "...") if len(text) > MAX_SHOWN else text
