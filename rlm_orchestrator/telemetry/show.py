"""Show one stored trace: a rich tree for the terminal, or a nested JSON document."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from rich.text import Text
from rich.tree import Tree

from rlm_orchestrator.telemetry.store import StoredSpan, TraceSummary, roots, summarize

# Attributes shown as `label=value` after the name, in this order (model, tokens, cost apart).
_SHOWN = (
    ("rlm.iteration", "iteration"),
    ("rlm.iterations", "iterations"),
    ("rlm.block", "block"),
    ("rlm.final_source", "final"),
)


def format_duration(ns: int) -> str:
    ms = ns / 1e6
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def format_cost(cost: float) -> str:
    return f"${cost:.4f}" if cost < 1 else f"${cost:.2f}"


def _order(span: StoredSpan) -> tuple[int, str]:
    return span.start_ns, span.span_id


def _walk(spans: Sequence[StoredSpan]) -> Iterator[tuple[StoredSpan, StoredSpan | None]]:
    """(span, parent) in depth-first order, children by start time; parent None at the top level.

    Roots and orphans (parent not stored) are the top level; spans caught in a parent cycle
    (malformed data) are shown at the top level too rather than dropped.
    """
    children: dict[str | None, list[StoredSpan]] = {}
    for span in sorted(spans, key=_order):
        children.setdefault(span.parent_span_id, []).append(span)
    seen: set[str] = set()
    for start in [*roots(spans), *sorted(spans, key=_order)]:
        stack: list[tuple[StoredSpan, StoredSpan | None]] = [(start, None)]
        while stack:
            span, parent = stack.pop()
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            yield span, parent
            stack.extend((child, span) for child in reversed(children.get(span.span_id, [])))


def _error_text(span: StoredSpan) -> str:
    if span.status_description:
        return span.status_description
    for event in span.events:
        if event.get("name") == "exception":
            attrs = event.get("attributes", {})
            return (
                f"{attrs.get('exception.type', 'exception')}: {attrs.get('exception.message', '')}"
            )
    return "error"


def _tokens(attrs: dict[str, Any]) -> str | None:
    tokens_in = attrs.get("gen_ai.usage.input_tokens")
    tokens_out = attrs.get("gen_ai.usage.output_tokens")
    if tokens_in is None and tokens_out is None:
        return None
    return (
        f"{'?' if tokens_in is None else tokens_in}→{'?' if tokens_out is None else tokens_out} tok"
    )


def span_label(span: StoredSpan, parent: StoredSpan | None) -> Text:
    """One line: name, duration, [service] if not the parent's, model, tokens, cost, details."""
    attrs = span.attributes
    label = Text(span.name, style="bold red" if span.is_error else "bold")
    label.append(f"  {format_duration(span.duration_ns)}", style="dim")
    if span.service and (parent is None or span.service != parent.service):
        label.append(f"  [{span.service}]", style="magenta")
    model = (
        attrs.get("gen_ai.response.model")
        or attrs.get("gen_ai.request.model")
        or attrs.get("rlm.root_model")
    )
    if model:
        label.append(f"  {model}", style="cyan")
    tokens = _tokens(attrs)
    if tokens:
        label.append(f"  {tokens}", style="green")
    cost = attrs.get("rlm.cost_usd")
    if isinstance(cost, int | float):
        label.append(f"  {format_cost(cost)}", style="yellow")
    if span.name == "rlm.completion" and "rlm.depth" in attrs:
        label.append(f"  depth={attrs['rlm.depth']}")
    for key, name in _SHOWN:
        if key in attrs:
            label.append(f"  {name}={attrs[key]}")
    status = attrs.get("rlm.exec.status")
    if status is not None:
        label.append(f"  status={status}", style="" if status == "ok" else "yellow")
    for key, value in attrs.items():
        if key.endswith("exit_code"):
            label.append(f"  exit={value}", style="" if str(value) == "0" else "yellow")
    if str(attrs.get("rlm.exec.worker_restarted", "")).lower() == "true":
        label.append("  worker restarted", style="yellow")
    if span.is_error:
        label.append(f"  ✗ {_error_text(span)}", style="red")
    if parent is None and span.parent_span_id is not None:
        label.append(f"  (parent {span.parent_span_id} not stored)", style="dim")
    return label


def summary_text(summary: TraceSummary) -> Text:
    text = Text(f"trace {summary.trace_id}", style="bold")
    text.append(f"  {summary.start.astimezone():%Y-%m-%d %H:%M:%S}", style="dim")
    text.append(f"  {format_duration(summary.duration_ns)}  {summary.span_count} spans")
    if summary.input_tokens or summary.output_tokens:
        text.append(f"  {summary.input_tokens}→{summary.output_tokens} tok", style="green")
    if summary.cost_usd is not None:
        text.append(f"  {format_cost(summary.cost_usd)}", style="yellow")
    if summary.error_count:
        s = "s" if summary.error_count > 1 else ""
        text.append(f"  {summary.error_count} error{s}", style="bold red")
    return text


def render_tree(spans: Sequence[StoredSpan]) -> Tree:
    """The trace as a tree under a summary line: parent/child by parent_span_id."""
    if not spans:
        return Tree(Text("no spans", style="dim"))
    tree = Tree(summary_text(summarize(spans)))
    nodes: dict[str, Tree] = {}
    for span, parent in _walk(spans):
        host = nodes[parent.span_id] if parent is not None else tree
        nodes[span.span_id] = host.add(span_label(span, parent))
    return tree


def trace_to_json(spans: Sequence[StoredSpan]) -> dict[str, Any]:
    """{"trace_id", "summary", "roots": [span, ...]}; each span has the keys name, span_id,
    parent_span_id, kind, start_ns, end_ns, duration_ms, status {code, description},
    attributes, service, events and children (by start time)."""
    top: list[dict[str, Any]] = []
    nodes: dict[str, dict[str, Any]] = {}
    for span, parent in _walk(spans):
        node: dict[str, Any] = {
            "name": span.name,
            "span_id": span.span_id,
            "parent_span_id": span.parent_span_id,
            "kind": span.kind,
            "start_ns": span.start_ns,
            "end_ns": span.end_ns,
            "duration_ms": span.duration_ns / 1e6,
            "status": {"code": span.status_code, "description": span.status_description},
            "attributes": span.attributes,
            "service": span.service,
            "events": span.events,
            "children": [],
        }
        (nodes[parent.span_id]["children"] if parent is not None else top).append(node)
        nodes[span.span_id] = node
    summary = summarize(spans).to_dict() if spans else None
    return {"trace_id": spans[0].trace_id if spans else None, "summary": summary, "roots": top}
