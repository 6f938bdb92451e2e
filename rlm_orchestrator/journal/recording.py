"""A recorded completion, as `replay` runs it again: the context, the sandbox it ran in, and its
blocks in order with their outputs and the answers their sub-calls got. Read from a journal
store (a completion id) or from a trajectory log (the JSONL `RLMLogger` writes).

What a trajectory log holds, and so what it can replay:
- not the context (the root model is shown only its shape): it is given again (`--context`),
  and checked against the shape the log recorded;
- each block's code, status and whole outputs (as the sandbox capped them);
- each sub-call's prompt and the answer the code got (`rlm_calls`): served again by prompt
  text, in the order they were recorded. Batched calls (`llm_query_batched`,
  `rlm_query_batched`) are served prompt by prompt, in any order; an `rlm_query` child RLM is
  not run again: its answer is served (its own blocks are in no log). The model a request named
  is not recorded, so not checked. A sub-call that failed (a model error, a spent budget) is
  not in the log: it replays as a request not in the record;
- not answer_dict's internal code: under that convention (known by the system prompt it
  recorded) the loop's `answer` dict is installed and re-wrapped as the loop does;
- one completion: a persistent session's log holds several, whose later contexts and
  histories are not in it.
A journal holds more: the context (a blob), the request's options (answer_dict's code runs as
in a trajectory when the journal does not hold it as blocks), each request's model and kind
(answers matched by digest), outputs as digests with their first characters. Not the server's
sandbox: the replay's own (`--environment`, or the server config's with `--config`; local by
default).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rlm_orchestrator.config.answer import ANSWER_DICT
from rlm_orchestrator.journal.replay import (
    MAX_SHOWN,
    BlockRecord,
    RecordedSubCalls,
    SubCallRecord,
    output_digest,
)
from rlm_orchestrator.journal.store import JournalStore
from rlm_orchestrator.prompts import system_prompt_for
from rlm_orchestrator.sandbox import SubCallOutcome

NOT_RECORDED = "replay: this request was not made when the block ran"


class RecordingError(ValueError):
    """A source that holds no replayable completion (a usage error: exit code 2)."""


class ServedAnswers(Protocol):
    """A block's sub-call handler during a replay, and what it could not serve."""

    missing: list[str]

    async def __call__(
        self, prompts: list[str], model: str, kind: str
    ) -> Sequence[SubCallOutcome]: ...

    @property
    def unused(self) -> int: ...


def _preview(text: str) -> str:
    return repr(text[:MAX_SHOWN] + "..." if len(text) > MAX_SHOWN else text)


class PromptAnswers:
    """Answers by prompt text (a trajectory's `rlm_calls`): each prompt of a request takes the
    first unused answer recorded for the same text."""

    def __init__(self, answers: Sequence[tuple[str, str]]) -> None:
        self._unused = list(answers)
        self.missing: list[str] = []

    async def __call__(self, prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
        served = []
        for prompt in prompts:
            at = next((i for i, (p, _) in enumerate(self._unused) if p == prompt), None)
            if at is None:
                self.missing.append(f"a {kind} request not in the record: {_preview(prompt)}")
                served.append(SubCallOutcome(error=NOT_RECORDED))
            else:
                served.append(SubCallOutcome(text=self._unused.pop(at)[1]))
        return served

    @property
    def unused(self) -> int:
        return len(self._unused)


class DigestAnswers(RecordedSubCalls):
    """A journal's answers, matched by request digest (prompts, model, kind); every request
    not in the record is kept, not only the last."""

    def __init__(self, records: Sequence[SubCallRecord]) -> None:
        super().__init__(records)
        self.missing: list[str] = []

    async def __call__(self, prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
        answers = await super().__call__(prompts, model, kind)
        if self.divergence is not None:
            self.missing.append(self.divergence)
            self.divergence = None
        return answers


@dataclass
class RecordedBlock:
    record: BlockRecord  # code, status, outputs (digests, and their start), internal
    turn: int  # from 1 (0: internal code)
    index: int  # within its turn, from 0
    # A trajectory's answers by prompt text; None: the record's digests (a journal).
    by_prompt: list[tuple[str, str]] | None = None
    # Why it is not run again ("" : it is).
    skip: str = ""

    def answers(self) -> ServedAnswers:
        if self.by_prompt is not None:
            return PromptAnswers(self.by_prompt)
        return DigestAnswers(self.record.sub_calls)


@dataclass
class Recording:
    source: str  # what it was read from, as the report names it
    environment: str
    environment_kwargs: dict[str, Any]
    blocks: list[RecordedBlock] = field(default_factory=list)
    setup_code: str | None = None
    context: Any = None
    has_context: bool = False  # False: a trajectory's (not in it; `--context`)
    # What the root model was told of the context's shape, to check a context given again.
    context_shape: str | None = None
    # Run answer_dict's internal code as the loop does (it is not in a trajectory).
    answer_dict: bool = False


# -- a trajectory log ----------------------------------------------------------------------


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError(f"{path}: cannot be read: {exc}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RecordingError(f"{path}, line {number}: not JSON ({exc})") from None
    return lines


def read_trajectory(path: Path) -> Recording:
    """A trajectory log: metadata, then one line per iteration (logger.py)."""
    lines = _lines(path)
    metadata = next((line for line in lines if line.get("type") == "metadata"), None)
    iterations = [line for line in lines if line.get("type") == "iteration"]
    if metadata is None:
        raise RecordingError(f"{path}: no metadata line: not a trajectory log (run --log-dir)")
    kwargs = dict(metadata.get("environment_kwargs") or {})
    recording = Recording(
        source=f"trajectory {path.name}",
        environment=str(metadata.get("environment_type") or "local"),
        environment_kwargs=kwargs,
        setup_code=kwargs.pop("setup_code", None),
    )
    first_prompt = iterations[0].get("prompt") if iterations else None
    if isinstance(first_prompt, list) and len(first_prompt) >= 2:
        system, shape = first_prompt[0], first_prompt[1]
        if isinstance(shape, dict) and shape.get("role") == "assistant":
            recording.context_shape = str(shape.get("content", ""))
        if isinstance(system, dict):
            recording.answer_dict = system.get("content") == system_prompt_for(ANSWER_DICT)
    for iteration in iterations:
        turn = int(iteration.get("iteration", 0))
        for index, block in enumerate(iteration.get("code_blocks") or []):
            recording.blocks.append(_trajectory_block(turn, index, block))
    return recording


def _trajectory_block(turn: int, index: int, block: dict[str, Any]) -> RecordedBlock:
    result = block.get("result") or {}
    stdout, stderr = str(result.get("stdout", "")), str(result.get("stderr", ""))
    # The whole outputs are in the log: kept whole, so a difference is shown where it is.
    record = BlockRecord(
        str(block.get("code", "")),
        stdout=output_digest(stdout),
        stderr=output_digest(stderr),
        stdout_start=stdout,
        stderr_start=stderr,
        status=str(result.get("status", "ok")),
    )
    answers = [
        (str(call.get("prompt", "")), str(call.get("response", "")))
        for call in result.get("rlm_calls") or []
    ]
    skip = ""
    if record.status == "sandbox_lost":
        skip = "its sandbox was lost when it ran: it did not run to its end"
    return RecordedBlock(record, turn, index, by_prompt=answers, skip=skip)


# -- a journal -----------------------------------------------------------------------------


def _option(request: dict[str, Any], name: str) -> Any:
    """A request option: at the top, or in `options` (the server's: protobuf JSON names)."""
    options = request.get("options")
    options = options if isinstance(options, dict) else {}
    camel = "".join(part.title() if i else part for i, part in enumerate(name.split("_")))
    for value in (request.get(name), options.get(name), options.get(camel)):
        if value is not None:
            return value
    return None


async def read_journal(store: JournalStore, completion_id: str) -> Recording:
    """A completion of a journal store: its request (the context's blob, its options), its
    block entries with their sub-call entries (recorder.py).

    A resumed completion ran its blocks again on the server that took it over, which journaled
    them again: each block (turn, index) counts once, where it first ran, with every answer its
    sub-calls got (some before the first server died, the rest after)."""
    from rlm_orchestrator.journal.recorder import context_of, sub_call_from

    record = await store.get(completion_id)
    if record is None:
        raise RecordingError(f"no completion {completion_id!r} in the journal")
    request = record.request
    kwargs = dict(request.get("environment_kwargs") or {})
    for name in ("exec_timeout_seconds", "max_output_chars"):
        if (value := _option(request, name)) is not None:
            kwargs.setdefault(name, value)
    recording = Recording(
        source=f"completion {completion_id}",
        environment=str(request.get("environment") or "local"),
        environment_kwargs=kwargs,
        setup_code=request.get("setup_code") or kwargs.pop("setup_code", None),
    )
    kwargs.pop("setup_code", None)
    blob = request.get("context_blob")
    if blob:
        try:
            data = await store.blob(str(blob))
        except KeyError:
            raise RecordingError(f"the context of {completion_id} is not in the journal") from None
        recording.context = context_of(request, data)
        recording.has_context = True
    entries = await store.entries(completion_id)
    answers: dict[tuple[int, int], list[SubCallRecord]] = defaultdict(list)
    for entry in entries:
        if entry.kind == "sub_call":
            key = (int(entry.payload["turn"]), int(entry.payload["block"]))
            answers[key].append(sub_call_from(entry.payload["record"]))
    seen: set[tuple[int, int]] = set()
    for entry in entries:
        if entry.kind != "block":
            continue
        key = (int(entry.payload["turn"]), int(entry.payload["block"]))
        block = BlockRecord.from_payload(entry.payload["record"])
        if not block.internal:
            if key in seen:
                continue  # run again by a resumed completion
            seen.add(key)
            block.sub_calls = answers.get(key, [])
        skip = "its sandbox was lost when it ran" if block.status == "sandbox_lost" else ""
        turn = 0 if block.internal else key[0]
        recording.blocks.append(RecordedBlock(block, turn, key[1], skip=skip))
    # answer_dict's internal code, when the journal does not hold it, runs as the loop runs it.
    internal = any(b.record.internal for b in recording.blocks)
    recording.answer_dict = not internal and _option(request, "answer_convention") == ANSWER_DICT
    return recording
