"""What the viewer shows, built from one trace's stored spans: JSON-ready dictionaries.

The page (static/app.js) only lays this out: completions with their turns, blocks and
sub-calls; a waterfall of every span with offsets from the trace's start, its process and
whether it is on the critical path; totals per model and per kind of work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rlm_orchestrator.telemetry.store import StoredSpan, TraceSummary, roots, summarize

# Sub-call and code text are previews: the page is for looking, `trace show --json` has it all.
PREVIEW_CHARS = 2000
# A trace whose spans do not all hang under one top span yet, with nothing new for this long,
# is not running any more (its process died, or spans were lost): "incomplete".
STALE_NS = 10 * 60 * 10**9


def status_of(spans: Sequence[StoredSpan]) -> str:
    """ "running" until every span hangs under one top span (a parent's span is stored when it
    ends, after its children), then "error" or "ok" by that span's status."""
    if not spans:
        return "running"
    tops = roots(spans)
    if len(tops) > 1:
        newest = max(s.end_ns or s.start_ns for s in spans)
        return "incomplete" if time.time_ns() - newest > STALE_NS else "running"
    return "error" if tops[0].is_error else "ok"


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def error_text(span: StoredSpan) -> str | None:
    if not span.is_error:
        return None
    if span.status_description:
        return span.status_description
    for event in span.events:
        if event.get("name") == "exception":
            attrs = event.get("attributes", {})
            return f"{attrs.get('exception.type', 'exception')}: {attrs.get('exception.message')}"
    return "error"


def kind_of(span: StoredSpan, parent: StoredSpan | None) -> str:
    """The kind of work: root-lm, sub-lm, code, sandbox, child-rlm, completion, turn, other."""
    if span.is_lm_call:
        return "root-lm" if parent is not None and parent.name == "rlm.turn" else "sub-lm"
    name = span.name
    if name in ("rlm.execute", "sandbox.execute"):
        return "code"
    if name.startswith(("rlm.sandbox.", "modal.sandbox", "kubernetes.")):
        return "sandbox"
    return {
        "rlm.rlm_query": "child-rlm",
        "rlm.completion": "completion",
        "rlm.turn": "turn",
        "rlm.compact": "compaction",
    }.get(name, "other")


def process_of(span: StoredSpan) -> str:
    """The process a span ran in: its service, and its pid when the resource says it."""
    service = span.service or "unknown"
    pid = span.resource.get("process.pid")
    return f"{service} pid {pid}" if pid else service


def lm_call(span: StoredSpan, t0: int) -> dict[str, Any]:
    attrs = span.attributes
    return {
        "span_id": span.span_id,
        "model": attrs.get("gen_ai.request.model"),
        "response_model": attrs.get("gen_ai.response.model"),
        "input_tokens": int(_number(attrs.get("gen_ai.usage.input_tokens"))),
        "output_tokens": int(_number(attrs.get("gen_ai.usage.output_tokens"))),
        "cost_usd": _number(attrs.get("rlm.cost_usd")),
        "attempts": int(_number(attrs.get("rlm.attempts")) or 1),
        "finish_reasons": attrs.get("gen_ai.response.finish_reasons"),
        "prompt": _text(attrs.get("gen_ai.prompt")),
        "completion": _text(attrs.get("gen_ai.completion")),
        "start_ms": _ms(span.start_ns - t0),
        "duration_ms": _ms(span.duration_ns),
        "error": error_text(span),
    }


class _Tree:
    def __init__(self, spans: Sequence[StoredSpan]) -> None:
        self.spans = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
        self.by_id = {s.span_id: s for s in self.spans}
        self.children: dict[str, list[StoredSpan]] = {}
        for span in self.spans:
            if span.parent_span_id in self.by_id:
                self.children.setdefault(span.parent_span_id, []).append(span)
        self.t0 = min((s.start_ns for s in self.spans), default=0)

    def kids(self, span: StoredSpan, name: str | None = None) -> list[StoredSpan]:
        found = self.children.get(span.span_id, [])
        return [s for s in found if name is None or s.name == name]

    def parent(self, span: StoredSpan) -> StoredSpan | None:
        return self.by_id.get(span.parent_span_id or "")

    def below(self, span: StoredSpan) -> list[StoredSpan]:
        """Every descendant, depth first (children by start time)."""
        found: list[StoredSpan] = []
        stack = list(reversed(self.kids(span)))
        while stack:
            child = stack.pop()
            found.append(child)
            stack.extend(reversed(self.kids(child)))
        return found

    def walk(self) -> list[tuple[StoredSpan, int]]:
        """(span, tree depth) depth first from the top spans; each span once."""
        out: list[tuple[StoredSpan, int]] = []
        seen: set[str] = set()
        for top in [*roots(self.spans), *self.spans]:
            stack = [(top, 0)]
            while stack:
                span, depth = stack.pop()
                if span.span_id in seen:
                    continue
                seen.add(span.span_id)
                out.append((span, depth))
                stack.extend((c, depth + 1) for c in reversed(self.kids(span)))
        return out

    def critical_path(self) -> set[str]:
        """Spans the trace's end waited on: from the end of each span back, the child that
        ended last before the time reached so far, then what that child waited on."""
        path: set[str] = set()
        for top in roots(self.spans)[:1]:
            stack = [top]
            while stack:
                span = stack.pop()
                path.add(span.span_id)
                cursor = span.end_ns or span.start_ns
                for child in sorted(self.kids(span), key=lambda s: -(s.end_ns or s.start_ns)):
                    end = child.end_ns or child.start_ns
                    if end <= cursor + 1_000_000:  # 1 ms of clock skew between processes
                        stack.append(child)
                        cursor = child.start_ns
        return path


def _block(tree: _Tree, span: StoredSpan) -> dict[str, Any]:
    attrs = span.attributes
    below = tree.below(span)
    own = [s for s in below if not _in_child(tree, s, span)]  # a child RLM's are its own
    sub_calls = [lm_call(s, tree.t0) for s in own if s.is_lm_call]
    children = [s.span_id for s in own if s.name == "rlm.completion"]
    return {
        "span_id": span.span_id,
        "block": attrs.get("rlm.block"),
        "code": _text(attrs.get("rlm.code")),
        "output": _text(attrs.get("rlm.output")),
        "status": attrs.get("rlm.exec.status"),
        "error": error_text(span),
        "start_ms": _ms(span.start_ns - tree.t0),
        "duration_ms": _ms(span.duration_ns),
        "sub_calls": sub_calls,
        "child_completions": children,
    }


def _in_child(tree: _Tree, span: StoredSpan, block: StoredSpan) -> bool:
    """Whether `span` belongs to a child RLM started from `block` (shown with that child)."""
    parent = tree.parent(span)
    while parent is not None and parent.span_id != block.span_id:
        if parent.name == "rlm.completion":
            return True
        parent = tree.parent(parent)
    return False


def _completion(tree: _Tree, span: StoredSpan) -> dict[str, Any]:
    attrs = span.attributes
    turns = []
    for turn in tree.kids(span, "rlm.turn"):
        calls = [lm_call(s, tree.t0) for s in tree.kids(turn) if s.is_lm_call]
        turns.append(
            {
                "span_id": turn.span_id,
                "iteration": int(_number(turn.attributes.get("rlm.iteration"))) + 1,
                "start_ms": _ms(turn.start_ns - tree.t0),
                "duration_ms": _ms(turn.duration_ns),
                "error": error_text(turn),
                "calls": calls,
                "blocks": [_block(tree, b) for b in tree.kids(turn, "rlm.execute")],
            }
        )
    return {
        "span_id": span.span_id,
        "depth": attrs.get("rlm.depth"),
        "model": attrs.get("rlm.root_model"),
        "iterations": attrs.get("rlm.iterations"),
        "final_source": attrs.get("rlm.final_source"),
        "answer": _text(attrs.get("rlm.answer")),
        "cost_usd": attrs.get("rlm.cost_usd"),
        "start_ms": _ms(span.start_ns - tree.t0),
        "duration_ms": _ms(span.duration_ns),
        "error": error_text(span),
        "turns": turns,
    }


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def totals(tree: _Tree) -> dict[str, Any]:
    """Tokens and cost per model (every LM call, children's included); per kind of work, the
    summed time of its spans and the wall time during which at least one ran."""
    models: dict[str, dict[str, Any]] = {}
    for span in tree.spans:
        if not span.is_lm_call:
            continue
        call = lm_call(span, tree.t0)
        row = models.setdefault(
            str(call["model"]),
            {"model": call["model"], "calls": 0, "input_tokens": 0, "output_tokens": 0,
             "cost_usd": 0.0, "retries": 0, "errors": 0},
        )  # fmt: skip
        row["calls"] += 1
        row["input_tokens"] += call["input_tokens"]
        row["output_tokens"] += call["output_tokens"]
        row["cost_usd"] += call["cost_usd"]
        row["retries"] += call["attempts"] - 1
        row["errors"] += call["error"] is not None
    kinds: dict[str, list[tuple[int, int]]] = {}
    for span in tree.spans:
        kind = kind_of(span, tree.parent(span))
        if kind in ("completion", "turn", "other"):
            continue  # containers: their time is their children's
        kinds.setdefault(kind, []).append((span.start_ns, span.end_ns or span.start_ns))
    work = [
        {"kind": kind, "count": len(spans), "summed_ms": _ms(sum(e - s for s, e in spans)),
         "wall_ms": _ms(_union_ns(spans))}
        for kind, spans in sorted(kinds.items())
    ]  # fmt: skip
    return {"models": sorted(models.values(), key=lambda r: str(r["model"])), "work": work}


def trace_view(spans: Sequence[StoredSpan]) -> dict[str, Any]:
    """Everything the page shows of one trace."""
    tree = _Tree(spans)
    summary: TraceSummary | None = summarize(spans) if spans else None
    critical = tree.critical_path()
    processes: dict[str, int] = {}
    waterfall = []
    for span, depth in tree.walk():
        process = process_of(span)
        processes.setdefault(process, len(processes))
        parent = tree.parent(span)
        waterfall.append(
            {
                "span_id": span.span_id,
                "parent_span_id": span.parent_span_id,
                "name": span.name,
                "depth": depth,
                "kind": kind_of(span, parent),
                "process": processes[process],
                "start_ms": _ms(span.start_ns - tree.t0),
                "duration_ms": _ms(span.duration_ns),
                "error": error_text(span),
                "critical": span.span_id in critical,
                "rlm_depth": span.attributes.get("rlm.depth"),
                "model": span.attributes.get("gen_ai.request.model"),
            }
        )
    completions = [_completion(tree, s) for s in tree.spans if s.name == "rlm.completion"]
    return {
        "trace_id": spans[0].trace_id if spans else None,
        "status": status_of(spans),
        "summary": summary.to_dict() if summary else None,
        "duration_ms": summary.duration_ns / 1e6 if summary else 0.0,
        "content_recorded": any(
            k in s.attributes for s in spans for k in ("gen_ai.prompt", "rlm.code")
        ),
        "completions": completions,
        "processes": list(processes),
        "spans": waterfall,
        "totals": totals(tree),
    }


def trace_list_item(spans: Sequence[StoredSpan]) -> dict[str, Any]:
    """One row of the list: the summary, the status and how the completion ended."""
    # The outermost completion starts first (it may hang under an RPC's span, under serve).
    completions = [s for s in spans if s.name == "rlm.completion"]
    attrs = min(completions, key=lambda s: s.start_ns).attributes if completions else {}
    return summarize(spans).to_dict() | {
        "status": status_of(spans),
        "root_model": attrs.get("rlm.root_model"),
        "final_source": attrs.get("rlm.final_source"),
        "iterations": attrs.get("rlm.iterations"),
    }
