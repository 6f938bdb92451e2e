"""The journal stores' contract, run against both: the embedded SQLite store and PostgreSQL
(a real server the tests start: postgres_support.py). Several stores on one database (two
connections, and separate processes) race the way two servers would."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from postgres_support import postgres_dsn, postgres_server  # noqa: F401  (fixtures)

from rlm_orchestrator.config.journal import JournalSettings, make_store, open_store
from rlm_orchestrator.journal.rows import sha256
from rlm_orchestrator.journal.store import (
    CompletionRecord,
    Entry,
    Event,
    JournalError,
    JournalStore,
)

StoreFactory = Callable[[], Awaitable[JournalStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'journal'}"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[StoreFactory]:
    """Opens stores on one database (each its own connection(s)); all closed after the test."""
    opened: list[JournalStore] = []

    async def factory() -> JournalStore:
        store = await open_store(JournalSettings(store=store_url))
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest.fixture
async def store(stores: StoreFactory) -> JournalStore:
    return await stores()


def running(cid: str, *, owner: str = "me", lease: float = 60.0, **kw: Any) -> CompletionRecord:
    return CompletionRecord(
        cid, {"prompt": "p", "options": {"max_iterations": 3}}, owner=owner,
        lease_until=time.time() + lease, **kw,
    )  # fmt: skip


def blob_count(url: str) -> int:
    """Rows in the blobs table, looked at beside the store."""
    settings = JournalSettings(store=url)
    if settings.kind == "sqlite":
        with sqlite3.connect(settings.directory / "journal.db") as db:
            return int(db.execute("SELECT count(*) FROM journal_blobs").fetchone()[0])
    import psycopg

    with psycopg.connect(url) as db:
        row = db.execute("SELECT count(*) FROM journal_blobs").fetchone()
        return int(row[0]) if row else 0


async def test_a_completion_begins_is_listed_and_ends(store: JournalStore) -> None:
    before = time.time()
    await store.begin(running("a", tenant="t1", session_id="s1", extra={"k": [1, 2]}))
    await asyncio.sleep(0.01)
    await store.begin(running("b", tenant="t2"))
    got = await store.get("a")
    assert got is not None and got.request == {"prompt": "p", "options": {"max_iterations": 3}}
    assert (got.tenant, got.session_id, got.state, got.owner) == ("t1", "s1", "running", "me")
    assert got.extra == {"k": [1, 2]} and got.result is None and got.size_bytes > 0
    assert before - 5 <= got.created_at <= got.updated_at <= time.time() + 5
    assert await store.get("nope") is None
    with pytest.raises(ValueError, match="already there"):
        await store.begin(running("a"))

    assert [r.completion_id for r in await store.find()] == ["b", "a"]  # newest first
    assert [r.completion_id for r in await store.find(tenant="t1")] == ["a"]
    assert [r.completion_id for r in await store.find(limit=1)] == ["b"]

    await store.end("a", "finished", {"answer": "42", "usage": {"tokens": 7}})
    ended = await store.get("a")
    assert ended is not None and ended.state == "finished"
    assert ended.result == {"answer": "42", "usage": {"tokens": 7}}
    assert (ended.owner, ended.lease_until) == ("", 0.0)
    assert ended.size_bytes > got.size_bytes
    assert [r.completion_id for r in await store.find(state="finished")] == ["a"]
    assert [r.completion_id for r in await store.find(state="running")] == ["b"]
    with pytest.raises(KeyError):
        await store.end("nope", "failed", {})
    with pytest.raises(ValueError, match="ends"):
        await store.end("b", "running", {})  # type: ignore[arg-type]


async def test_entries_and_events_continue_in_order(store: JournalStore) -> None:
    await store.begin(running("c"))
    payloads: list[dict[str, Any]] = [
        {"code": "x = 1", "outputs": ["é", 2]},
        {"answers": ["y" * 200]},
        {"n": None},
    ]
    await store.append("c", [Entry(1, "root", payloads[0]), Entry(2, "sub_calls", payloads[1])])
    await store.append("c", [Entry(3, "block", payloads[2])])
    await store.append("c", [])
    entries = await store.entries("c")
    assert [(e.seq, e.kind) for e in entries] == [(1, "root"), (2, "sub_calls"), (3, "block")]
    assert [e.payload for e in entries] == payloads

    with pytest.raises(ValueError, match="already there"):
        await store.append("c", [Entry(3, "block", {})])
    with pytest.raises(ValueError, match="does not follow"):
        await store.append("c", [Entry(5, "block", {})])
    with pytest.raises(ValueError, match="does not follow"):
        await store.append("c", [Entry(4, "block", {}), Entry(6, "block", {})])
    with pytest.raises(KeyError):
        await store.append("nope", [Entry(1, "root", {})])
    assert len(await store.entries("c")) == 3  # nothing of a refused append

    await store.append_events("c", [Event(i, f"event {i}".encode()) for i in range(1, 6)])
    await store.append_events("c", [Event(6, b"\x00\xff")])
    assert [e.offset for e in await store.events("c")] == [1, 2, 3, 4, 5, 6]
    assert [e.data for e in await store.events("c", after=4)] == [b"event 5", b"\x00\xff"]
    assert [e.offset for e in await store.events("c", after=1, limit=2)] == [2, 3]
    assert await store.events("c", after=6) == []
    with pytest.raises(ValueError, match="already there"):
        await store.append_events("c", [Event(6, b"again")])

    await store.end("c", "cancelled", {})
    with pytest.raises(ValueError, match="ended"):
        await store.append("c", [Entry(4, "turn", {})])
    with pytest.raises(ValueError, match="ended"):
        await store.append_events("c", [Event(7, b"late")])


async def test_concurrent_appends_commit_together_and_fail_alone(store: JournalStore) -> None:
    """What a batch's sub-calls do: many appends at once; one refused spoils no other."""
    for cid in ("p", "q"):
        await store.begin(running(cid))
    calls = [store.append("p", [Entry(i, "sub_calls", {"i": i})]) for i in range(1, 101)]
    calls.insert(50, store.append("q", [Entry(2, "sub_calls", {})]))  # a gap: refused
    calls.append(store.append("q", [Entry(1, "sub_calls", {})]))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes[50], ValueError)
    assert [o for i, o in enumerate(outcomes) if i != 50] == [None] * 101
    assert [e.payload["i"] for e in await store.entries("p")] == list(range(1, 101))
    assert [e.seq for e in await store.entries("q")] == [1]


async def test_a_cancelled_append_is_written_and_the_next_ones_follow_it(
    store: JournalStore,
) -> None:
    await store.begin(running("k"))
    tasks = [
        asyncio.ensure_future(store.append("k", [Entry(i, "sub_calls", {"i": i})]))
        for i in range(1, 21)
    ]
    await asyncio.sleep(0)  # all called
    tasks[3].cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert outcomes[:3] + outcomes[4:] == [None] * 19
    assert [e.seq for e in await store.entries("k")] == list(range(1, 21))


async def test_blobs_are_stored_once_and_freed_with_their_last_user(
    stores: StoreFactory, store_url: str
) -> None:
    store = await stores()
    context = b"a context " * 10_000
    digest = await store.put_blob("x", context)
    assert digest == sha256(context)
    assert await store.put_blob("y", context) == digest  # another completion, same content
    assert await store.put_blob("x", context) == digest
    other = await store.put_blob("y", b"only y's")
    assert blob_count(store_url) == 2
    assert await store.blob(digest) == context
    with pytest.raises(KeyError):
        await store.blob("0" * 64)

    await store.begin(running("x"))
    await store.begin(running("y"))
    assert await store.delete("x") is True
    assert await store.blob(digest) == context  # y still uses it
    assert await store.delete("x") is False
    assert await store.delete("y") is True
    assert blob_count(store_url) == 0
    for gone in (digest, other):
        with pytest.raises(KeyError):
            await store.blob(gone)


async def test_two_writers_appending_the_same_seq_one_is_refused(stores: StoreFactory) -> None:
    first, second = await stores(), await stores()
    await first.begin(running("w"))
    await first.append("w", [Entry(1, "root", {})])
    outcomes = await asyncio.gather(
        first.append("w", [Entry(2, "block", {"by": "first"})]),
        second.append("w", [Entry(2, "block", {"by": "second"}), Entry(3, "turn", {})]),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, ValueError)]
    assert len(refused) == 1 and outcomes.count(None) == 1, outcomes
    entries = await second.entries("w")
    assert len(entries) in (2, 3) and entries[1].seq == 2  # the winner's, whole


async def test_expired_leases_are_claimed_and_renew_says_what_was_taken(
    stores: StoreFactory,
) -> None:
    old, new = await stores(), await stores()
    await old.begin(running("e1", owner="old", lease=0.3))
    await old.begin(running("e2", owner="old", lease=60))
    await old.begin(running("e3", owner="old", lease=-1))
    await old.begin(running("done", owner="old", lease=-1))
    await old.end("done", "finished", {})
    claimed = await new.claim("new", 30)
    assert [r.completion_id for r in claimed] == ["e3"]
    assert claimed[0].owner == "new" and claimed[0].lease_until > time.time() + 20
    await asyncio.sleep(0.4)
    claimed = await new.claim("new", 30)
    assert [r.completion_id for r in claimed] == ["e1"]
    assert await new.claim("new", 30) == []
    assert await old.renew("old", ["e1", "e2", "e3", "gone"], 60) == ["e1", "e3", "gone"]
    assert await new.renew("new", ["e1", "e3"], 60) == []
    assert await new.renew("new", [], 60) == []
    record = await new.get("e1")
    assert record is not None and record.owner == "new"


async def _claim_all(store: JournalStore, owner: str) -> list[str]:
    got: list[str] = []
    while claimed := await store.claim(owner, 60, limit=7):
        got += [r.completion_id for r in claimed]
    return got


async def test_stores_racing_to_claim_take_each_completion_once(stores: StoreFactory) -> None:
    many = [await stores() for _ in range(3)]
    ids = [f"r{i:03d}" for i in range(120)]
    for cid in ids:
        await many[0].begin(running(cid, owner="dead", lease=-1))
    claims = await asyncio.gather(*(_claim_all(s, f"o{i}") for i, s in enumerate(many)))
    taken = [cid for claim in claims for cid in claim]
    assert sorted(taken) == ids  # every one, none twice


CLAIMER = """
import asyncio, json, sys
from rlm_orchestrator.config.journal import JournalSettings, open_store

async def main():
    store = await open_store(JournalSettings(store=sys.argv[1]))
    print("READY", flush=True)
    sys.stdin.readline()  # all start claiming at once
    got = []
    try:
        while claimed := await store.claim(sys.argv[2], 60, limit=5):
            got += [r.completion_id for r in claimed]
    finally:
        await store.close()
    print(json.dumps(got))

asyncio.run(main())
"""


async def test_processes_racing_to_claim_take_each_completion_once(
    store: JournalStore, store_url: str
) -> None:
    ids = [f"p{i:03d}" for i in range(150)]
    for cid in ids:
        await store.begin(running(cid, owner="dead", lease=-1))
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLAIMER,
            store_url,
            f"proc{i}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(3)
    ]
    for process in processes:
        assert process.stdout is not None
        ready = await asyncio.wait_for(process.stdout.readline(), 60)
        assert ready == b"READY\n", (ready, await process.communicate())
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
    results = await asyncio.gather(*(process.communicate() for process in processes))
    taken: list[str] = []
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err.decode()[-2000:]
        taken += json.loads(out.decode().splitlines()[-1])
    assert sorted(taken) == ids


async def test_prune_by_age_then_by_size_keeps_running_ones(stores: StoreFactory) -> None:
    store = await stores()
    for i in range(6):
        cid = f"old{i}"
        await store.begin(running(cid))
        await store.append(cid, [Entry(1, "block", {"out": "z" * 1000})])
        await store.put_blob(cid, f"context {i}".encode() * 100)
        await store.end(cid, "finished", {"answer": i})
        await asyncio.sleep(0.02)  # distinct end times: the oldest is old0
    await store.begin(running("live"))
    await store.append("live", [Entry(1, "block", {"out": "z" * 1000})])
    await asyncio.sleep(0.2)
    await store.end("old5", "failed", {})  # ended just now: younger than the age limit

    assert await store.prune(max_age_seconds=None, max_bytes=None) == 0
    assert await store.prune(max_age_seconds=0.15, max_bytes=None) == 5
    assert {r.completion_id for r in await store.find()} == {"old5", "live"}
    assert await store.prune(max_age_seconds=3600, max_bytes=10**9) == 0
    assert await store.prune(max_age_seconds=None, max_bytes=1) == 1  # live stays regardless
    assert [r.completion_id for r in await store.find()] == ["live"]
    assert len(await store.entries("live")) == 1


async def test_prune_frees_the_blobs_of_completions_that_never_began(
    stores: StoreFactory, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await stores()
    await store.put_blob("never-began", b"a context nobody ran")
    kept = await store.put_blob("began", b"kept")
    await store.begin(running("began"))
    assert await store.prune(max_age_seconds=None, max_bytes=None) == 0
    assert blob_count(store_url) == 2  # within the grace: its completion may be beginning
    for module in ("sqlite_retention", "postgres"):
        monkeypatch.setattr(f"rlm_orchestrator.journal.{module}.ORPHAN_GRACE_SECONDS", -1.0)
    assert await store.prune(max_age_seconds=None, max_bytes=None) == 0  # no completion
    assert blob_count(store_url) == 1 and await store.blob(kept) == b"kept"


async def test_size_limit_deletes_the_oldest_ended_first(store: JournalStore) -> None:
    for i in range(4):
        await store.begin(running(f"s{i}"))
        await store.append(f"s{i}", [Entry(1, "block", {"out": "z" * 2000})])
        await store.end(f"s{i}", "finished", {})
        await asyncio.sleep(0.02)
    sizes = {r.completion_id: r.size_bytes for r in await store.find()}
    keep = sizes["s2"] + sizes["s3"]
    assert await store.prune(max_age_seconds=None, max_bytes=keep) == 2
    assert sorted(r.completion_id for r in await store.find()) == ["s2", "s3"]


async def test_the_sqlite_store_survives_a_reopen_and_refuses_when_closed(tmp_path: Path) -> None:
    settings = JournalSettings(store=f"sqlite:{tmp_path}/j")
    store = await open_store(settings)
    await store.begin(running("d"))
    await store.append("d", [Entry(1, "root", {"r": 1})])
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(Exception, match="not open"):
        await store.get("d")
    again = make_store(settings)
    async with again:  # type: ignore[attr-defined]
        assert [e.payload for e in await again.entries("d")] == [{"r": 1}]
    assert (tmp_path / "j" / "journal.db").is_file()


async def test_a_store_that_cannot_be_used_says_so(tmp_path: Path) -> None:
    """Not a database, or one a newer version wrote: JournalError at open, the file intact."""
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "journal.db").write_bytes(b"not a database, " * 100)
    with pytest.raises(JournalError, match="journal database error"):
        await open_store(JournalSettings(store=f"sqlite:{garbage}"))
    assert (garbage / "journal.db").read_bytes() == b"not a database, " * 100

    newer = JournalSettings(store=f"sqlite:{tmp_path}/newer")
    await (await open_store(newer)).close()
    with sqlite3.connect(tmp_path / "newer" / "journal.db") as db:
        db.execute("UPDATE journal_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match="newer than this version"):
        await open_store(newer)
