"""The journal of durable completions on the embedded store (SQLite in a temp dir, WAL,
synchronous=NORMAL): what recording a completion costs per code block and per sub-call.

- per code block: one `append` of 3 entries (the root response, the block with its code and
  outputs, the turn) and 3 `append_events` of 2 events each, awaited one after the other;
- per sub-call, as a batch's sub-calls make them (`llm_query_batched`): 1,000 appends of one
  "sub_calls" entry (a prompt's hash, the model, a 200-character answer) issued together, the
  wall time over the 1,000: the store commits what queued meanwhile in one transaction;
- reference rows, no target: one such append awaited alone (a commit each, plus the hop to the
  store's thread and back), and the event loop's own CPU time for it (`time.thread_time` on
  the loop's thread: what the loop pays; the commit runs on the store's thread).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from typing import Any

from bench.common import Metric, timing
from rlm_orchestrator.journal.sqlite import SqliteJournalStore
from rlm_orchestrator.journal.store import CompletionRecord, Entry, Event

NAME = "journal"
DESCRIPTION = "journal appends on the embedded SQLite store: per code block, per sub-call"
BLOCKS, BATCH, ROUNDS, LONE = 300, 1000, 15, 1000
BLOCK_TARGET_MS, SUB_CALL_TARGET_US = 1.0, 50.0

ROOT: dict[str, Any] = {
    "text": "Let me look at the context.\n```repl\n" + "x = 1\n" * 40 + "```",
    "tokens": 812,
}
BLOCK: dict[str, Any] = {"code": "x = 1\n" * 40, "stdout": "y" * 1000, "stderr": "", "status": "ok"}
TURN: dict[str, Any] = {"told": "Code executed:\n" + "z" * 600}
SUB_CALL: dict[str, Any] = {
    "prompts": ["3f" * 32],
    "model": "sub",
    "kind": "llm_query",
    "answers": ["a" * 200],
}


class _Counter:
    def __init__(self) -> None:
        self.seq = self.offset = 0

    def entries(self, *payloads: dict[str, Any], kind: str = "block") -> list[Entry]:
        out = []
        for payload in payloads:
            self.seq += 1
            out.append(Entry(self.seq, kind, payload))
        return out

    def events(self, count: int) -> list[Event]:
        out = []
        for _ in range(count):
            self.offset += 1
            out.append(Event(self.offset, b"\x08\x01\x12\x40" + b"e" * 120))
        return out


async def _block(store: SqliteJournalStore, cid: str, counter: _Counter) -> float:
    start = time.perf_counter()
    await store.append(cid, counter.entries(ROOT, BLOCK, TURN))
    for _ in range(3):
        await store.append_events(cid, counter.events(2))
    return time.perf_counter() - start


async def _batch(store: SqliteJournalStore, cid: str, counter: _Counter) -> float:
    appends = [store.append(cid, counter.entries(SUB_CALL, kind="sub_calls")) for _ in range(BATCH)]
    start = time.perf_counter()
    await asyncio.gather(*appends)
    return (time.perf_counter() - start) / BATCH


async def run() -> list[Metric]:
    directory = tempfile.mkdtemp(prefix="bench-journal-")
    try:
        async with SqliteJournalStore(directory) as store:
            counter = _Counter()
            await store.begin(CompletionRecord("bench", {"prompt": "p"}, owner="bench"))
            for _ in range(20):  # warm-up: statements prepared, pages cached
                await _block(store, "bench", counter)
            blocks = [await _block(store, "bench", counter) for _ in range(BLOCKS)]
            batches = [await _batch(store, "bench", counter) for _ in range(ROUNDS)]
            lone, loop_cpu = [], []
            for _ in range(LONE):
                entries = counter.entries(SUB_CALL, kind="sub_calls")
                wall, cpu = time.perf_counter(), time.thread_time()
                await store.append("bench", entries)
                loop_cpu.append(time.thread_time() - cpu)
                lone.append(time.perf_counter() - wall)
            assert len(await store.entries("bench")) == counter.seq
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return [
        timing(
            NAME,
            "per code block: append of 3 entries + 3 append_events of 2, awaited in turn",
            blocks, "ms", "<", BLOCK_TARGET_MS,
        ),
        timing(
            NAME,
            f"per sub-call: {BATCH:,} appends of one sub_calls entry issued together "
            "(a batch's sub-calls), wall time / append",
            batches, "us", "<", SUB_CALL_TARGET_US,
        ),
        timing(NAME, "per sub-call: one append awaited alone (latency; info)", lone, "us"),
        timing(
            NAME,
            "per sub-call: the event loop's CPU for one append awaited alone (info)",
            loop_cpu, "us",
        ),
    ]  # fmt: skip
