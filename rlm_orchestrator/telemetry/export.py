"""A stored trace in the formats other viewers read: Chrome trace events, OTLP JSON.

`to_chrome`: the Trace Event Format that Perfetto and chrome://tracing open. Each process that
recorded spans (the orchestrator, each sandbox agent) is a process track, and the LM calls the
orchestrator made are a track of their own ("LM router"), so 15 concurrent sub-calls show as
15 rows. Within a track, spans go on rows (tids) greedily: a span joins its parent's row, or
the first row where it overlaps nothing except spans it nests in or that nest in it, else a
new row; so no row ever shows a span cut by another. A parent and child on different tracks
are joined by a flow arrow.

`to_otlp_json`: the OTLP/HTTP JSON encoding of an ExportTraceServiceRequest (what an
OpenTelemetry Collector accepts at /v1/traces): ids in hex, times as strings of unix
nanoseconds, attributes as typed values, enums as integers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rlm_orchestrator.telemetry.store import StoredSpan

__all__ = ["FORMATS", "to_chrome", "to_otlp_json"]

FORMATS = ("chrome", "otlp-json")
ROUTER_TRACK = "LM router"
# OTLP's SpanKind and StatusCode numbers (trace.proto).
_KINDS = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}
_SCOPE = "rlm_orchestrator"


def _track(span: StoredSpan) -> tuple[str, str]:
    """(process label, row-group key): the service and its pid; the orchestrator's LM calls
    on a track of their own."""
    service = span.service or "unknown"
    pid = span.resource.get("process.pid") or span.resource.get("service.instance.id")
    label = f"{service} (pid {pid})" if pid else service
    if span.is_lm_call and service != "rlm-sandbox-agent":
        label = f"{ROUTER_TRACK} · {label}"
    return label, label


def _end(span: StoredSpan) -> int:
    return span.end_ns if span.end_ns is not None else span.start_ns


def _fits(row: list[StoredSpan], span: StoredSpan, ancestors: set[str]) -> bool:
    """Whether `span` can share a row with `row`'s spans: each is disjoint from it in time, or
    one of its ancestors that contains it (a viewer draws a span inside another on one row as
    its child, so only a real ancestor may hold it)."""
    start, end = span.start_ns, _end(span)
    for other in row:
        o_start, o_end = other.start_ns, _end(other)
        disjoint = end <= o_start or o_end <= start
        inside = other.span_id in ancestors and o_start <= start and end <= o_end
        if not (disjoint or inside):
            return False
    return True


def _ancestors(span: StoredSpan, by_id: dict[str, StoredSpan]) -> set[str]:
    found: set[str] = set()
    parent = span.parent_span_id
    while parent is not None and parent in by_id and parent not in found:
        found.add(parent)
        parent = by_id[parent].parent_span_id
    return found


def _ordered(spans: Sequence[StoredSpan]) -> list[StoredSpan]:
    """Parents before children (by start, longest first at equal starts)."""
    return sorted(spans, key=lambda s: (s.start_ns, -_end(s), s.span_id))


def to_chrome(spans: Sequence[StoredSpan]) -> dict[str, Any]:
    """The trace as a Trace Event Format document (JSON object form)."""
    events: list[dict[str, Any]] = []
    if not spans:
        return {"traceEvents": events, "displayTimeUnit": "ms"}
    t0 = min(s.start_ns for s in spans)
    pids: dict[str, int] = {}
    rows: dict[int, list[list[StoredSpan]]] = {}
    placed: dict[str, tuple[int, int]] = {}  # span id -> (pid, tid)
    by_id = {s.span_id: s for s in spans}

    def us(ns: int) -> float:
        return (ns - t0) / 1000  # relative: absolute µs as floats would lose the nanoseconds

    for span in _ordered(spans):
        label, _ = _track(span)
        if label not in pids:
            pids[label] = len(pids) + 1
            events.append(_meta("process_name", pids[label], 0, label))
            events.append(_meta("process_sort_index", pids[label], 0, pids[label]))
        pid = pids[label]
        tracks = rows.setdefault(pid, [])
        parent = placed.get(span.parent_span_id or "")
        preferred = [parent[1] - 1] if parent is not None and parent[0] == pid else []
        ancestors = _ancestors(span, by_id)
        candidates = [*preferred, *range(len(tracks))]
        tid = next((i + 1 for i in candidates if _fits(tracks[i], span, ancestors)), None)
        if tid is None:
            tracks.append([])
            tid = len(tracks)
            events.append(_meta("thread_name", pid, tid, f"row {tid}"))
        tracks[tid - 1].append(span)
        placed[span.span_id] = (pid, tid)
        args: dict[str, Any] = {
            "span_id": span.span_id,
            "parent_span_id": span.parent_span_id,
            "service": span.service,
            "status": span.status_code,
            **span.attributes,
        }
        if span.status_description:
            args["status_description"] = span.status_description
        events.append(
            {
                "name": span.name,
                "cat": span.kind.lower() if span.kind else "span",
                "ph": "X",
                "ts": us(span.start_ns),
                "dur": (_end(span) - span.start_ns) / 1000,
                "pid": pid,
                "tid": tid,
                "args": args,
            }
        )
        if parent is not None and parent[0] != pid and span.parent_span_id in by_id:
            # Across tracks nesting cannot show: an arrow from the parent to the child.
            flow = {"name": "child", "cat": "parent", "id": span.span_id, "ts": us(span.start_ns)}
            events.append({**flow, "ph": "s", "pid": parent[0], "tid": parent[1]})
            events.append({**flow, "ph": "f", "bp": "e", "pid": pid, "tid": tid})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"trace_id": spans[0].trace_id, "start_unix_nano": str(t0)},
    }


def _meta(name: str, pid: int, tid: int, value: Any) -> dict[str, Any]:
    key = "sort_index" if name.endswith("sort_index") else "name"
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}


def _any_value(value: Any) -> dict[str, Any]:
    """An OTLP AnyValue in its JSON encoding (int64 as a string)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": _attributes(value)}}
    return {"stringValue": value if isinstance(value, str) else json.dumps(value, default=str)}


def _attributes(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": str(k), "value": _any_value(v)} for k, v in attributes.items()]


def _otlp_span(span: StoredSpan) -> dict[str, Any]:
    status: dict[str, Any] = {"code": _STATUS.get(span.status_code, 0)}
    if span.status_description:
        status["message"] = span.status_description
    data: dict[str, Any] = {
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name,
        "kind": _KINDS.get(span.kind, 1),
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(_end(span)),
        "attributes": _attributes(span.attributes),
        "events": [
            {
                "timeUnixNano": str(e.get("timestamp_ns") or 0),
                "name": str(e.get("name", "")),
                "attributes": _attributes(e.get("attributes") or {}),
            }
            for e in span.events
        ],
        "status": status,
    }
    if span.parent_span_id:
        data["parentSpanId"] = span.parent_span_id
    return data


def to_otlp_json(spans: Sequence[StoredSpan]) -> dict[str, Any]:
    """The trace as an ExportTraceServiceRequest in OTLP/HTTP JSON: one resourceSpans per
    resource (the orchestrator, each agent). The instrumentation scope is not stored: all
    spans come under one scope."""
    groups: dict[str, tuple[dict[str, Any], list[StoredSpan]]] = {}
    for span in _ordered(spans):
        key = json.dumps(span.resource, sort_keys=True, default=str)
        groups.setdefault(key, (span.resource, []))[1].append(span)
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes(resource)},
                "scopeSpans": [
                    {"scope": {"name": _SCOPE}, "spans": [_otlp_span(s) for s in members]}
                ],
            }
            for resource, members in groups.values()
        ]
    }
