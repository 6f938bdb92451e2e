"""One completion's journal: what the loop writes as it runs, and what a resumed run reads back.

Entries (store.py), in the order they happened:
- "lm": the n-th call of the root model (turns, summaries, the last answer out of turns):
  {"n", "model", "text", "finish_reason", "usage", "response_model", "duration"};
- "sub_call": one request of a block's sub-calls and its answers:
  {"turn", "block", "record": SubCallRecord as a dict};
- "block": a finished block: {"turn", "block", "record": BlockRecord as a dict, sub-calls
  left out (they are the block's "sub_call" entries)}; internal code has turn 0.

A resumed completion runs the loop again from the start with this journal as its source: the
n-th root call is answered by the n-th "lm" entry, a block's sub-calls by its "sub_call"
entries (no model is called, nothing is paid twice), and every block runs again in the new
sandbox, which rebuilds its namespace. Events are not sent again while it catches up
(`replaying`): the client had them.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from rlm_orchestrator.journal.replay import BlockRecord, SubCallRecord
from rlm_orchestrator.journal.store import Entry, JournalStore
from rlm_orchestrator.router import LMAnswer, UsageTracker
from rlm_orchestrator.types import ModelUsageSummary


def context_of(request: dict[str, Any], data: bytes) -> Any:
    """A completion's context from its blob, as its request's `context_encoding` says."""
    text = data.decode("utf-8")
    return json.loads(text) if request.get("context_encoding") == "json" else text


def sub_call_payload(record: SubCallRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def sub_call_from(payload: dict[str, Any]) -> SubCallRecord:
    outcomes = [(o[0], o[1]) for o in payload["outcomes"]]
    return SubCallRecord(
        payload["digest"], payload["model"], payload["kind"], outcomes, payload.get("usage") or []
    )


class CompletionJournal:
    """Writes one completion's entries (each durable when its method returns) and, when it
    resumes, serves what was recorded."""

    def __init__(
        self, store: JournalStore, completion_id: str, recorded: Sequence[Entry] = ()
    ) -> None:
        self.store = store
        self.completion_id = completion_id
        self._seq = max((e.seq for e in recorded), default=0)
        self._lm: dict[int, dict[str, Any]] = {}
        self._sub_calls: dict[tuple[int, int], list[SubCallRecord]] = defaultdict(list)
        # Blocks already journaled: run again on resume, they are not written twice.
        self._blocks: set[tuple[int, int]] = set()
        for entry in recorded:
            if entry.kind == "lm":
                self._lm[int(entry.payload["n"])] = entry.payload
            elif entry.kind == "sub_call":
                key = (int(entry.payload["turn"]), int(entry.payload["block"]))
                self._sub_calls[key].append(sub_call_from(entry.payload["record"]))
            elif entry.kind == "block":
                self._blocks.add((int(entry.payload["turn"]), int(entry.payload["block"])))
        self._calls = 0
        # True while a resumed run catches up with what was recorded.
        self.replaying = bool(self._lm)

    async def _append(self, kind: str, payload: dict[str, Any]) -> None:
        # No lock: a store applies one completion's appends in the order they were called, so
        # concurrent sub-calls' entries commit together instead of one after another.
        self._seq += 1
        await self.store.append(self.completion_id, [Entry(self._seq, kind, payload)])

    # -- root model calls --------------------------------------------------------------------

    def recorded_call(self) -> LMAnswer | None:
        """The recorded answer of the next root call, when there is one (then it counts as
        made); None: the call is to be made, and `lm_answer` records it."""
        payload = self._lm.get(self._calls + 1)
        if payload is None:
            self.replaying = False
            return None
        self._calls += 1
        usage = ModelUsageSummary.from_dict(payload["usage"])
        answer = LMAnswer(
            text=payload["text"],
            model=payload["model"],
            usage=usage,
            duration=float(payload.get("duration", 0.0)),
            response_model=payload.get("response_model", ""),
            finish_reason=payload.get("finish_reason", "stop"),
        )
        return answer

    async def lm_answer(self, answer: LMAnswer) -> None:
        self._calls += 1
        await self._append(
            "lm",
            {
                "n": self._calls,
                "model": answer.model,
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "usage": answer.usage.to_dict(),
                "response_model": answer.response_model,
                "duration": answer.duration,
            },
        )

    # -- blocks ------------------------------------------------------------------------------

    def recorded_sub_calls(self, turn: int, block: int) -> list[SubCallRecord]:
        return list(self._sub_calls.get((turn, block), ()))

    async def sub_call(self, turn: int, block: int, record: SubCallRecord) -> None:
        payload = {"turn": turn, "block": block, "record": sub_call_payload(record)}
        await self._append("sub_call", payload)

    async def block(self, turn: int, block: int, record: BlockRecord) -> None:
        if (turn, block) in self._blocks:
            return
        self._blocks.add((turn, block))
        payload = record.to_payload()
        payload["sub_calls"] = []  # they are the block's "sub_call" entries
        await self._append("block", {"turn": turn, "block": block, "record": payload})


class JournaledLM:
    """The loop's root model: answered from the journal while it has answers (their usage
    counted again, as it was paid), else by the router, each answer journaled."""

    def __init__(self, router: Any, journal: CompletionJournal) -> None:
        self._router = router
        self.journal = journal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._router, name)

    async def complete(
        self,
        prompt: Any,
        *,
        model: str | None = None,
        depth: int = 0,
        tracker: UsageTracker | None = None,
        max_tokens: int | None = None,
    ) -> LMAnswer:
        recorded = self.journal.recorded_call()
        if recorded is not None:
            if tracker is not None:
                tracker.record(recorded.model, recorded.usage)
            return recorded
        answer: LMAnswer = await self._router.complete(
            prompt, model=model, depth=depth, tracker=tracker, max_tokens=max_tokens
        )
        await self.journal.lm_answer(answer)
        return answer
