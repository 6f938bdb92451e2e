"""The in-memory journal store keeps the store contract (store.py), refusals included."""

from __future__ import annotations

import asyncio
import time

import pytest

from rlm_orchestrator.journal.memory import MemoryJournalStore
from rlm_orchestrator.journal.store import CompletionRecord, Entry, Event


def running(cid: str, owner: str = "me", lease: float = 60.0, tenant: str = "") -> CompletionRecord:
    return CompletionRecord(
        cid, {"prompt": "p"}, tenant=tenant, owner=owner, lease_until=time.time() + lease
    )


async def test_entries_and_events_continue_in_order_and_ended_ones_refuse_more() -> None:
    async with MemoryJournalStore() as store:
        await store.begin(running("c"))
        with pytest.raises(ValueError, match="already there"):
            await store.begin(running("c"))
        await store.append("c", [Entry(1, "lm", {"n": 1}), Entry(2, "block", {"x": [1]})])
        with pytest.raises(ValueError, match="another writer"):
            await store.append("c", [Entry(2, "lm", {})])
        with pytest.raises(ValueError, match="a gap"):
            await store.append("c", [Entry(4, "lm", {})])
        await store.append_events("c", [Event(1, b"a"), Event(2, b"b"), Event(3, b"c")])
        assert [e.seq for e in await store.entries("c")] == [1, 2]
        assert [e.data for e in await store.events("c", after=1, limit=1)] == [b"b"]
        with pytest.raises(KeyError):
            await store.append("nope", [Entry(1, "lm", {})])
        await store.end("c", "finished", {"response": "r"})
        with pytest.raises(ValueError, match="has ended"):
            await store.append("c", [Entry(3, "lm", {})])
        record = await store.get("c")
        assert record is not None and record.state == "finished" and record.owner == ""
        assert record.result == {"response": "r"} and record.size_bytes > 0
        with pytest.raises(KeyError):
            await store.end("nope", "failed", {})


async def test_what_is_read_back_is_a_copy() -> None:
    store = MemoryJournalStore()
    await store.begin(running("c"))
    payload = {"list": [1]}
    await store.append("c", [Entry(1, "lm", payload)])
    payload["list"].append(2)
    (entry,) = await store.entries("c")
    entry.payload["list"].append(3)
    assert (await store.entries("c"))[0].payload == {"list": [1]}


async def test_claim_takes_expired_leases_once_and_renew_says_what_was_lost() -> None:
    store = MemoryJournalStore()
    await store.begin(running("dead", owner="a", lease=-1))
    await store.begin(running("alive", owner="a"))
    claimed = await store.claim("b", 30.0)
    assert [r.completion_id for r in claimed] == ["dead"] and claimed[0].owner == "b"
    assert await store.claim("c", 30.0) == []
    assert await store.renew("a", ["dead", "alive", "unknown"], 30.0) == ["dead", "unknown"]
    assert await store.renew("b", ["dead"], 30.0) == []


async def test_find_is_newest_first_by_state_and_tenant() -> None:
    store = MemoryJournalStore()
    for cid, tenant in (("1", "t"), ("2", "u"), ("3", "t")):
        await store.begin(running(cid, tenant=tenant))
        await asyncio.sleep(0.002)
    await store.end("2", "cancelled", {})
    assert [r.completion_id for r in await store.find()] == ["3", "2", "1"]
    assert [r.completion_id for r in await store.find(tenant="t", limit=1)] == ["3"]
    assert [r.completion_id for r in await store.find(state="cancelled")] == ["2"]


async def test_a_blob_lives_while_a_completion_refers_to_it() -> None:
    store = MemoryJournalStore()
    digest = await store.put_blob("a", b"context")
    assert await store.put_blob("b", b"context") == digest
    await store.begin(running("a"))
    await store.begin(running("b"))
    assert await store.delete("a") is True
    assert await store.blob(digest) == b"context"
    assert await store.delete("b") is True and await store.delete("b") is False
    with pytest.raises(KeyError):
        await store.blob(digest)


async def test_prune_deletes_old_then_oldest_ended_ones_and_keeps_running_ones() -> None:
    store = MemoryJournalStore()
    for cid in ("old", "mid", "new", "run"):
        await store.begin(running(cid))
        await store.append(cid, [Entry(1, "lm", {"text": "x" * 1000})])
        if cid != "run":
            await store.end(cid, "finished", {})
        await asyncio.sleep(0.002)
    assert await store.prune(max_age_seconds=3600, max_bytes=None) == 0
    held = store.size_bytes()
    assert await store.prune(max_age_seconds=None, max_bytes=held - 1) == 1
    assert await store.get("old") is None and await store.get("mid") is not None
    assert await store.prune(max_age_seconds=0, max_bytes=None) == 2
    assert [r.completion_id for r in await store.find()] == ["run"]
