"""The completion viewer in a real headless browser (Debian's chromium), against
`rlm-orchestrator ui` over a trace recorded by a scripted completion.

Screenshots are saved in the test's tmp dir; with RLM_UI_SCREENSHOTS=DIR they are copied
there too (`RLM_UI_SCREENSHOTS=docs` refreshes docs/ui-screenshot.png, the README's).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import SUB_MODEL, repl
from test_trace_store import _record_completion
from ui_support import (
    ROOT_TURN_1,
    SUB_CALLS,
    Element,
    chromium,
    dump_dom,
    parse_dom,
    percent,
    run_traced,
    screenshot,
    script_completion,
    viewer,
)

from rlm_orchestrator.telemetry.store import TraceStore
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from rlm_orchestrator.ui.app import ViewerSettings, create_app

pytestmark = pytest.mark.slow


def _keep(path: Path, name: str | None = None) -> None:
    """A screenshot was taken; with `name`, copied where RLM_UI_SCREENSHOTS says (the README's
    is made that way)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    target = os.environ.get("RLM_UI_SCREENSHOTS")
    if target and name:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)


def _rows(table: Element) -> list[list[str]]:
    return [[td.text.strip() for td in tr.find_all("td")] for tr in table.find_all("tr")[1:]]


def test_the_page_shows_turns_concurrent_sub_calls_and_totals(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    chromium()
    script_completion(lm)
    recorded = run_traced(lm, tmp_path / "traces.db")
    assert recorded.response == "THE CHILD QUESTION"
    trace_id = TraceStore(recorded.store).trace_ids(1)[0]
    with viewer(recorded.store) as url:
        page = f"{url}#/trace/{trace_id}"
        dom = parse_dom(dump_dom(page))
        _keep(screenshot(page, tmp_path / "trace.png", height=1500), "ui-screenshot.png")
        _keep(screenshot(page, tmp_path / "trace-full.png", height=3400))
        listing = parse_dom(dump_dom(url))
        _keep(screenshot(url, tmp_path / "list.png", height=500))
    (body,) = dom.find_all("body")
    assert body.attrs.get("data-ready") == "ok"

    # Every turn: the root's two, the child RLM's two; responses, code and output as text.
    completions = dom.find_all("section", "completion")
    assert [c.attrs["data-depth"] for c in completions] == ["0", "1"]
    root, child = completions
    root_turns = root.find_all("article", "turn")
    assert [t.attrs["data-iteration"] for t in root_turns] == ["1", "2"]
    assert len(child.find_all("article", "turn")) == 2
    first = root_turns[0]
    assert first.find_all("pre", "response-text")[0].text == ROOT_TURN_1
    (block,) = first.find_all("div", "block")
    assert "llm_query_batched(prompts)" in block.find_all("pre", "code")[0].text
    assert block.find_all("pre", "output")[0].text == "15 answer 0\nchild said THE CHILD QUESTION\n"
    calls = block.find_all("tr", "sub-call")
    assert len(calls) == SUB_CALLS
    cells = [[td.text for td in call.find_all("td")] for call in calls]
    assert sorted(c[7] for c in cells) == sorted(f"item {i}" for i in range(SUB_CALLS))
    assert {c[8] for c in cells} == {f"answer {i}" for i in range(SUB_CALLS)}
    assert all(c[1] == SUB_MODEL and c[6] == "1" for c in cells)
    # The final answer, and how it was reached.
    answer = root.find_all("div", "answer")[-1]
    assert "FINAL_VAR" in answer.text and "after 2 turn(s)" in answer.text
    assert answer.find_all("pre", "answer-text")[0].text == "THE CHILD QUESTION"

    # The timeline: the 15 sub-calls' bars overlap (one instant is inside all of them).
    bars = dom.find_all("div", "bar")
    names = [b.attrs["data-name"] for b in bars]
    assert names.count("sandbox.execute") == 2 and names.count("rlm.completion") == 2
    subs = [b for b in bars if b.attrs["data-kind"] == "sub-lm"]
    assert len(subs) == SUB_CALLS
    spans = [(percent(b.style()["left"]), percent(b.style()["width"])) for b in subs]
    assert max(left for left, _ in spans) < min(left + width for left, width in spans)
    assert all(width > 5 for _, width in spans)  # 0.4 s each, of a trace of ~1-2 s
    # Processes: the orchestrator and the two sandbox agents (parent's and child's).
    legend = [span.text for span in dom.find_all("span", "proc")]
    assert legend[0].startswith("rlm-orchestrator") and len(legend) == 3
    assert all(name.startswith("rlm-sandbox-agent pid ") for name in legend[1:])
    assert sum("critical" in b.classes for b in subs) == 1  # the one the block waited on last

    # Totals: tokens and cost per model as the completion's usage summary says.
    (models,) = dom.find_all("table", "totals-models")
    usage = recorded.usage["model_usage_summaries"]
    shown = {row[0]: row for row in _rows(models)}
    assert set(shown) == set(usage)
    for model, summary in usage.items():
        row = shown[model]
        assert row[1:4] == [
            str(summary["total_calls"]),
            str(summary["total_input_tokens"]),
            str(summary["total_output_tokens"]),
        ]
        assert row[4] == f"${summary['total_cost']:.6f}"
    (work,) = dom.find_all("table", "totals-work")
    kinds = {row[0]: row for row in _rows(work)}
    assert kinds["sub-lm"][1] == str(SUB_CALLS)

    # The list links to the completion.
    links = [a.attrs["href"] for a in listing.find_all("a")]
    assert f"#/trace/{trace_id}" in links
    assert "ok" in [b.text for b in listing.find_all("span", "badge")]


PAYLOAD = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def test_model_output_and_prints_render_as_text(lm: ScriptedLMServer, tmp_path: Path) -> None:
    chromium()
    printed = repr(PAYLOAD)
    script_completion(
        lm, root=[f"Look: {PAYLOAD}\n" + repl(f"x = {printed}\nprint(x)"), f"FINAL({PAYLOAD})"]
    )
    recorded = run_traced(lm, tmp_path / "traces.db")
    assert recorded.response == PAYLOAD
    trace_id = TraceStore(recorded.store).trace_ids(1)[0]
    with viewer(recorded.store) as url:
        page = f"{url}#/trace/{trace_id}"
        html = dump_dom(page)
        _keep(screenshot(page, tmp_path / "hostile.png", height=900))
    dom = parse_dom(html)
    # No element from the payload: the page's one script, no image; the title untouched.
    assert [s.attrs.get("src") for s in dom.find_all("script")] == ["/static/app.js"]
    assert dom.find_all("img") == []
    assert dom.find_all("title")[0].text == "rlm-orchestrator · completions"
    assert "pwned" not in dom.find_all("title")[0].text
    # The payload is there as text: in the response, the code, the output and the answer.
    texts = [p.text for p in dom.find_all("pre")]
    assert f"Look: {PAYLOAD}" in texts[0] or any(t.startswith(f"Look: {PAYLOAD}") for t in texts)
    assert f"{PAYLOAD}\n" in texts  # the printed output
    assert PAYLOAD in texts  # the final answer
    assert "&lt;script&gt;" in html  # escaped in the serialized DOM, never markup


async def test_a_running_completion_updates_live(tmp_path: Path) -> None:
    """The page polls while the trace runs: its completion's span arrives between two polls,
    and the page shows it finished, then stops polling."""
    chromium()
    db = tmp_path / "t.db"
    trace_id = _record_completion(db)
    shift = time.time_ns() - 1_700_000_000_000_000_000 - 3 * 10**9  # recorded 3 s ago
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE spans SET start_ns = start_ns + ?, end_ns = end_ns + ?", (shift,) * 2)
        root = conn.execute("SELECT * FROM spans WHERE parent_span_id IS NULL").fetchone()
        conn.execute("DELETE FROM spans WHERE parent_span_id IS NULL")
    polls: list[str] = []

    async def on_response(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/api/traces/"):
            polls.append(request.path)
            if len(polls) == 2:  # the completion ends now
                with closing(sqlite3.connect(db)) as conn, conn:
                    conn.execute(f"INSERT INTO spans VALUES ({', '.join('?' * len(root))})", root)

    app = create_app(ViewerSettings(store=db))
    app.on_response_prepare.append(on_response)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        html = await asyncio.to_thread(dump_dom, str(server.make_url(f"/#/trace/{trace_id}")))
    finally:
        await server.close()
    dom = parse_dom(html)
    assert dom.find_all("body")[0].attrs.get("data-ready") == "ok"
    assert len(polls) == 3, polls  # running, running, then ok: no more polls
    assert "running" not in [b.text for b in dom.find_all("span", "badge")]
