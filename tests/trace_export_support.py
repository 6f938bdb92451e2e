"""Checks of exported traces: a Chrome trace-event checker, and OTLP JSON ids for protobuf."""

from __future__ import annotations

import base64
from typing import Any

from rlm_orchestrator.telemetry.store import StoredSpan


def check_trace_events(document: dict[str, Any], spans: list[StoredSpan]) -> None:
    """A trace-event checker: every span once as a complete event, each child inside its
    parent in time, rows that never cut a span, and one process id per recording process."""
    events = document["traceEvents"]
    assert all(e["ph"] in "XMsf" for e in events)
    complete = [e for e in events if e["ph"] == "X"]
    by_span = {e["args"]["span_id"]: e for e in complete}
    assert len(complete) == len(by_span) == len(spans)
    assert set(by_span) == {s.span_id for s in spans}
    for e in complete:
        assert e["dur"] >= 0 and e["ts"] >= 0
        parent = by_span.get(e["args"]["parent_span_id"] or "")
        if parent is not None:
            assert parent["ts"] <= e["ts"] and e["ts"] + e["dur"] <= parent["ts"] + parent["dur"]
    # On one row, two spans are disjoint or one holds the other (Perfetto's nesting rule).
    rows: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for e in complete:
        rows.setdefault((e["pid"], e["tid"]), []).append(e)
    for row in rows.values():
        for a in row:
            for b in row:
                a_end, b_end = a["ts"] + a["dur"], b["ts"] + b["dur"]
                disjoint = a_end <= b["ts"] or b_end <= a["ts"]
                nested = (a["ts"] <= b["ts"] and b_end <= a_end) or (
                    b["ts"] <= a["ts"] and a_end <= b_end
                )
                assert a is b or disjoint or nested
    # One process id per process that recorded spans: its resource (service and pid).
    pids: dict[tuple[str, Any, bool], set[int]] = {}
    for span in spans:
        key = (span.service or "", span.resource.get("process.pid"), span.is_lm_call)
        pids.setdefault(key, set()).add(by_span[span.span_id]["pid"])
    assert all(len(found) == 1 for found in pids.values()), pids
    assert len({next(iter(p)) for p in pids.values()}) == len(pids)
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert set(names) == {e["pid"] for e in complete}
    # Flows come in pairs (start at the parent, finish at the child on another track).
    starts = [e["id"] for e in events if e["ph"] == "s"]
    assert sorted(starts) == sorted(e["id"] for e in events if e["ph"] == "f")


def hex_ids_to_base64(data: Any) -> Any:
    """OTLP JSON writes ids in hex; protobuf's JSON mapping reads bytes as base64."""
    if isinstance(data, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId")
            else hex_ids_to_base64(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [hex_ids_to_base64(v) for v in data]
    return data
