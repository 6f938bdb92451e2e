"""The local trace store: SQLite exporter, read side, tree/JSON rendering and `trace` CLI."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, Status, StatusCode
from rich.console import Console
from typer.testing import CliRunner

from rlm_orchestrator.telemetry.show import render_tree, trace_to_json
from rlm_orchestrator.telemetry.store import (
    _COLUMNS,
    DEFAULT_STORE_PATH,
    SqliteSpanExporter,
    StoredSpan,
    TraceStore,
    TraceStoreError,
    store_path,
)
from rlm_orchestrator.telemetry.trace_cli import trace_app

T0 = 1_700_000_000_000_000_000  # ns
MS = 1_000_000


def _provider(db: Path, service: str) -> TracerProvider:
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}), shutdown_on_exit=False
    )
    provider.add_span_processor(SimpleSpanProcessor(SqliteSpanExporter(db)))
    return provider


@dataclass
class Recorded:
    db: Path
    trace_id: str
    sandbox_span_id: str


def _record_completion(db: Path, offset_ns: int = 0) -> str:
    """One completion: 2 turns, 3 LM calls (one in a child RLM), an execution with its
    agent-side span, and a failed execution. Returns the trace id."""
    orch, agent = _provider(db, "rlm-orchestrator"), _provider(db, "rlm-sandbox-agent")
    tracer, agent_tracer = orch.get_tracer("test"), agent.get_tracer("test")

    def span(name: str, parent: Span | None, start_ms: float, attributes: Any = None,
             t: trace.Tracer = tracer) -> Span:  # fmt: skip
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        return t.start_span(
            name, context=ctx, attributes=attributes, start_time=T0 + offset_ns + int(start_ms * MS)
        )

    def end(s: Span, at_ms: float) -> None:
        s.end(end_time=T0 + offset_ns + int(at_ms * MS))

    def chat(parent: Span, start: float, stop: float, tokens_in: int, tokens_out: int,
             cost: float, depth: int) -> None:  # fmt: skip
        s = span("chat gpt-test", parent, start, {
            "gen_ai.system": "openai", "gen_ai.request.model": "gpt-test",
            "gen_ai.response.model": "gpt-test-0613", "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out, "rlm.cost_usd": cost, "rlm.depth": depth,
        })  # fmt: skip
        end(s, stop)

    try:
        root = span("rlm.completion", None, 0, {"rlm.depth": 0, "rlm.root_model": "gpt-test"})
        create = span("rlm.sandbox.create", root, 1)
        end(create, 40)
        turn1 = span("rlm.turn", root, 50, {"rlm.iteration": 1})
        chat(turn1, 51, 171, 1000, 200, 0.002, 0)
        execute = span("rlm.execute", turn1, 180, {"rlm.block": 0, "rlm.exec.status": "ok"})
        sandbox = span("sandbox.execute", execute, 182, {"rlm.exec.status": "ok"}, agent_tracer)
        child = span("rlm.completion", sandbox, 190, {"rlm.depth": 1, "rlm.cost_usd": 0.001})
        chat(child, 191, 300, 300, 50, 0.001, 1)
        end(child, 310)
        end(sandbox, 320)
        end(execute, 321)
        end(turn1, 330)
        turn2 = span("rlm.turn", root, 340, {"rlm.iteration": 2})
        chat(turn2, 341, 400, 1500, 80, 0.003, 0)
        failed = span("rlm.execute", turn2, 410, {"rlm.block": 0, "rlm.exec.status": "error"})
        try:
            raise ValueError("boom")
        except ValueError as exc:
            failed.record_exception(exc)
        failed.set_status(Status(StatusCode.ERROR, "ValueError: boom"))
        end(failed, 420)
        end(turn2, 430)
        release = span("rlm.sandbox.release", root, 440)
        end(release, 450)
        root.set_attributes(
            {"rlm.iterations": 2, "rlm.cost_usd": 0.006, "rlm.final_source": "text"}
        )
        end(root, 2500)
        return format(root.get_span_context().trace_id, "032x")
    finally:
        orch.shutdown()
        agent.shutdown()


@pytest.fixture
def recorded(tmp_path: Path) -> Recorded:
    db = tmp_path / "t.db"
    trace_id = _record_completion(db)
    spans = TraceStore(db).spans(trace_id)
    return Recorded(db, trace_id, next(s.span_id for s in spans if s.name == "sandbox.execute"))


def test_exporter_writes_rows(recorded: Recorded) -> None:
    with closing(sqlite3.connect(recorded.db)) as conn:
        rows = conn.execute(
            "SELECT trace_id, span_id, parent_span_id, name, status_code, status_description,"
            " attributes, resource, events FROM spans"
        ).fetchall()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(rows) == 12
    assert {r[0] for r in rows} == {recorded.trace_id}
    assert all(len(r[1]) == 16 for r in rows)
    by_name = {r[3]: r for r in rows}
    (root,) = [r for r in rows if r[2] is None]
    assert root[3] == "rlm.completion"
    assert json.loads(root[6]) == {
        "rlm.depth": 0, "rlm.root_model": "gpt-test", "rlm.iterations": 2,
        "rlm.cost_usd": 0.006, "rlm.final_source": "text",
    }  # fmt: skip
    assert json.loads(root[7])["service.name"] == "rlm-orchestrator"
    sandbox = by_name["sandbox.execute"]
    assert json.loads(sandbox[7])["service.name"] == "rlm-sandbox-agent"
    assert by_name["rlm.execute"][2] is not None
    failed = next(r for r in rows if r[4] == "ERROR")
    assert failed[5] == "ValueError: boom"
    assert json.loads(failed[8])[0]["name"] == "exception"


def test_summary_values(recorded: Recorded) -> None:
    store = TraceStore(recorded.db)
    (summary,) = store.traces()
    assert summary.trace_id == recorded.trace_id
    assert summary.name == "rlm.completion"
    assert summary.span_count == 12
    assert (summary.input_tokens, summary.output_tokens) == (2800, 330)
    assert summary.cost_usd == pytest.approx(0.006)  # the root's
    assert summary.error_count == 1
    assert summary.duration_ns == 2500 * MS
    assert summary.services == ("rlm-orchestrator", "rlm-sandbox-agent")
    json.dumps(summary.to_dict())
    # A second, newer trace comes first. The root's cost wins; without it, the LM calls'
    # costs are summed (not the child RLM's own total, which would count one twice).
    second = _record_completion(recorded.db, offset_ns=10_000 * MS)
    with closing(sqlite3.connect(recorded.db)) as conn, conn:
        update = "UPDATE spans SET attributes = ? WHERE trace_id = ? AND parent_span_id IS NULL"
        conn.execute(update, ('{"rlm.cost_usd": 0.5}', recorded.trace_id))
        conn.execute(update, ("{}", second))
    newest, older = store.traces()
    assert (newest.trace_id, older.trace_id) == (second, recorded.trace_id)
    assert older.cost_usd == 0.5
    assert newest.cost_usd == pytest.approx(0.006)
    assert store.last_trace_id() == second
    assert [s.trace_id for s in store.traces(limit=1)] == [second]


def test_resolve_prefix(recorded: Recorded) -> None:
    store = TraceStore(recorded.db)
    assert store.resolve(recorded.trace_id[:6].upper()) == recorded.trace_id
    assert store.resolve(recorded.trace_id) == recorded.trace_id
    other = "f" * 32 if not recorded.trace_id.startswith("f") else "0" * 32
    with pytest.raises(TraceStoreError, match="no trace"):
        store.resolve(other[:8])
    with pytest.raises(TraceStoreError, match="not a trace id"):
        store.resolve("xyz%")
    twin = recorded.trace_id[:4] + ("0" if recorded.trace_id[4] != "0" else "1") * 28
    with closing(sqlite3.connect(recorded.db)) as conn, conn:
        rest = _COLUMNS.split(", ", 1)[1]  # a copy of the trace, under another id
        conn.execute(
            f"INSERT INTO spans SELECT ?, {rest} FROM spans WHERE trace_id = ?",
            (twin, recorded.trace_id),
        )
    with pytest.raises(TraceStoreError, match="ambiguous"):
        store.resolve(recorded.trace_id[:4])
    assert store.resolve(recorded.trace_id[:5]) == recorded.trace_id


def _render(spans: list[StoredSpan]) -> str:
    console = Console(record=True, width=120)
    console.print(render_tree(spans))
    return console.export_text()


def test_render_tree(recorded: Recorded) -> None:
    text = _render(TraceStore(recorded.db).spans(recorded.trace_id))
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {recorded.trace_id}")
    assert "12 spans" in lines[0] and "2800→330 tok" in lines[0] and "1 error" in lines[0]

    def line(fragment: str, nth: int = 0) -> str:
        return [ln for ln in lines if fragment in ln][nth]

    def indent(ln: str) -> int:
        return next(i for i, c in enumerate(ln) if c.isalnum())

    root, create, turn1 = line("rlm.completion"), line("rlm.sandbox.create"), line("iteration=1")
    execute, sandbox = line("rlm.execute"), line("sandbox.execute")
    child = line("rlm.completion", 1)
    assert indent(root) < indent(create) == indent(turn1) < indent(execute) < indent(sandbox)
    assert indent(sandbox) < indent(child) < indent(line("chat gpt-test", 1))
    # Order by start: create, turn 1, turn 2, release.
    assert lines.index(create) < lines.index(turn1) < lines.index(line("iteration=2"))
    assert lines.index(line("iteration=2")) < lines.index(line("rlm.sandbox.release"))
    assert "2.50 s" in root and "[rlm-orchestrator]" in root and "gpt-test" in root
    assert "$0.0060" in root and "iterations=2" in root and "final=text" in root
    assert "39 ms" in create
    assert "[rlm-sandbox-agent]" in sandbox and "138 ms" in sandbox
    assert "[rlm-orchestrator]" in child and "depth=1" in child  # back from the agent
    assert "[" not in execute  # same service as its parent
    chat_line = line("chat gpt-test")
    assert "120 ms" in chat_line and "gpt-test-0613" in chat_line and "1000→200 tok" in chat_line
    assert "$0.0020" in chat_line and "[" not in chat_line
    failed = line("status=error")
    assert "✗ ValueError: boom" in failed and "10 ms" in failed


def test_render_orphans_and_cycles(recorded: Recorded) -> None:
    spans = TraceStore(recorded.db).spans(recorded.trace_id)
    # Without the orchestrator-side execute span, the agent's span is an orphan at the top.
    without = [s for s in spans if s.name != "rlm.execute" or s.is_error]
    text = _render(without)
    top = [ln for ln in text.splitlines() if ln[:4] in ("├── ", "└── ")]
    assert len(top) == 2
    assert "rlm.completion" in top[0] and "sandbox.execute" in top[1]
    assert "not stored" in top[1] and "[rlm-sandbox-agent]" in top[1]
    assert "rlm.completion" in text.split("sandbox.execute")[1]  # its child stays below it
    data = trace_to_json(without)
    assert [r["name"] for r in data["roots"]] == ["rlm.completion", "sandbox.execute"]
    assert sum(1 for _ in _iter_nodes(data["roots"])) == 11
    assert "no spans" in _render([])


def test_render_parent_cycle() -> None:
    def stored(span_id: str, parent: str | None, start: int) -> StoredSpan:
        return StoredSpan("t" * 32, span_id, parent, f"s-{span_id}", "INTERNAL", start,
                          start + MS, "UNSET", None)  # fmt: skip

    # Malformed: a and b are each other's parent. They are shown at the top, not dropped.
    spans = [stored("r", None, 0), stored("a", "b", 1), stored("b", "a", 2), stored("c", "r", 3)]
    text = _render(spans)
    assert all(f"s-{i}" in text for i in "rabc")
    roots = trace_to_json(spans)["roots"]
    assert [r["name"] for r in roots] == ["s-r", "s-a"]
    assert roots[1]["children"][0]["name"] == "s-b"


def _iter_nodes(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for node in nodes:
        yield node
        yield from _iter_nodes(node["children"])


def test_trace_to_json(recorded: Recorded) -> None:
    data = json.loads(json.dumps(trace_to_json(TraceStore(recorded.db).spans(recorded.trace_id))))
    assert data["trace_id"] == recorded.trace_id
    assert data["summary"]["span_count"] == 12
    (root,) = data["roots"]
    assert set(root) == {
        "name", "span_id", "parent_span_id", "kind", "start_ns", "end_ns", "duration_ms",
        "status", "attributes", "service", "events", "children",
    }  # fmt: skip
    assert root["duration_ms"] == 2500
    assert [c["name"] for c in root["children"]] == [
        "rlm.sandbox.create", "rlm.turn", "rlm.turn", "rlm.sandbox.release",
    ]  # fmt: skip
    execute = root["children"][1]["children"][1]
    assert execute["name"] == "rlm.execute"
    (sandbox,) = execute["children"]
    assert sandbox["service"] == "rlm-sandbox-agent"
    assert sandbox["span_id"] == recorded.sandbox_span_id
    assert sandbox["parent_span_id"] == execute["span_id"]
    assert sandbox["children"][0]["attributes"]["rlm.depth"] == 1
    failed = root["children"][2]["children"][1]
    assert failed["status"] == {"code": "ERROR", "description": "ValueError: boom"}
    assert failed["events"][0]["attributes"]["exception.type"] == "ValueError"
    assert sum(1 for _ in _iter_nodes(data["roots"])) == 12


runner = CliRunner()


def test_cli_show_and_list(recorded: Recorded) -> None:
    store = ["--store", str(recorded.db)]
    result = runner.invoke(trace_app, ["show", "--last", *store])
    assert result.exit_code == 0, result.output
    assert "rlm.completion" in result.stdout and "sandbox.execute" in result.stdout
    result = runner.invoke(trace_app, ["show", recorded.trace_id[:8], "--json", *store])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trace_id"] == recorded.trace_id
    result = runner.invoke(trace_app, ["list", "--json", *store])
    assert result.exit_code == 0, result.output
    (listed,) = json.loads(result.stdout)
    assert listed["trace_id"] == recorded.trace_id and listed["error_count"] == 1
    result = runner.invoke(trace_app, ["list", *store], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert recorded.trace_id[:16] in result.stdout and "2800→330" in result.stdout
    assert "$0.0060" in result.stdout and "…" not in result.stdout
    result = runner.invoke(trace_app, ["list", *store], env={"COLUMNS": "160"})
    assert "rlm.completion" in result.stdout
    assert "rlm-orchestrator, rlm-sandbox-agent" in result.stdout


def test_cli_errors(recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = "f" * 32 if not recorded.trace_id.startswith("f") else "0" * 32
    result = runner.invoke(trace_app, ["show", unknown, "--store", str(recorded.db)])
    assert result.exit_code == 1
    assert "no trace" in result.stderr and result.stdout == ""
    result = runner.invoke(trace_app, ["show", "--store", str(recorded.db)])
    assert result.exit_code == 1 and "--last" in result.stderr
    missing = tmp_path / "missing.db"
    for args in (["list"], ["show", "--last"]):
        result = runner.invoke(trace_app, [*args, "--store", str(missing)])
        assert result.exit_code == 1 and "no trace store" in result.stderr
    assert not missing.exists()
    empty = SqliteSpanExporter(tmp_path / "empty.db")
    assert empty.export([]) is SpanExportResult.SUCCESS  # the schema, no spans
    empty.shutdown()
    result = runner.invoke(trace_app, ["list", "--store", str(tmp_path / "empty.db")])
    assert result.exit_code == 0 and "no traces yet" in result.stdout
    result = runner.invoke(trace_app, ["show", "--last", "--store", str(tmp_path / "empty.db")])
    assert result.exit_code == 1 and "no traces in" in result.stderr
    # The store path comes from RLM_TRACE_STORE when --store is not given.
    monkeypatch.setenv("RLM_TRACE_STORE", str(recorded.db))
    assert store_path(None) == recorded.db
    assert runner.invoke(trace_app, ["show", "--last", "--json"]).exit_code == 0
    monkeypatch.delenv("RLM_TRACE_STORE")
    assert store_path(None) == DEFAULT_STORE_PATH
    assert store_path(tmp_path / "x.db") == tmp_path / "x.db"


def test_export_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.get_tracer("test").start_span("x").end()
    provider.shutdown()
    spans = memory.get_finished_spans()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    exporter = SqliteSpanExporter(blocker / "t.db")  # its parent is a file
    with caplog.at_level(logging.WARNING):
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert exporter.export(spans) is SpanExportResult.FAILURE
    assert len([r for r in caplog.records if "could not write spans" in r.message]) == 1
    exporter.shutdown()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    bad = SqliteSpanExporter(garbage)
    assert bad.export(spans) is SpanExportResult.FAILURE
    bad.shutdown()
    good = SqliteSpanExporter(tmp_path / "new" / "t.db")
    assert good.export(spans) is SpanExportResult.SUCCESS
    assert good.force_flush()
    good.shutdown()
    assert good.export(spans) is SpanExportResult.FAILURE  # after shutdown
    with pytest.raises(TraceStoreError, match="cannot read"):
        TraceStore(garbage).traces()


def test_concurrent_batch_export(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    providers = []
    for _ in range(2):  # two exporters on one file, each with its batch thread
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(
            BatchSpanProcessor(SqliteSpanExporter(db), schedule_delay_millis=5)
        )
        providers.append(provider)

    def work(provider: TracerProvider) -> None:
        tracer = provider.get_tracer("test")
        for i in range(50):
            with tracer.start_as_current_span("outer"), tracer.start_as_current_span(f"s{i}"):
                pass

    threads = [threading.Thread(target=work, args=(p,)) for p in providers for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for provider in providers:
        provider.shutdown()
    store = TraceStore(db)
    summaries = store.traces(limit=1000)
    assert len(summaries) == 300
    assert sum(s.span_count for s in summaries) == 600
