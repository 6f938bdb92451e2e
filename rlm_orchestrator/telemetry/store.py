"""A local trace store for people without a tracing backend: finished spans in one SQLite file.

`SqliteSpanExporter` is the write side (an OpenTelemetry span exporter, usually behind a
BatchSpanProcessor); `TraceStore` is the read side used by `rlm-orchestrator trace`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from rlm_orchestrator.exceptions import TraceStoreError

__all__ = [
    "DEFAULT_STORE_PATH",
    "STORE_ENV",
    "SqliteSpanExporter",
    "StoredSpan",
    "TraceStore",
    "TraceStoreError",
    "TraceSummary",
    "roots",
    "store_path",
    "summarize",
]

log = logging.getLogger(__name__)

STORE_ENV = "RLM_TRACE_STORE"
DEFAULT_STORE_PATH = Path.home() / ".local" / "share" / "rlm-orchestrator" / "traces.db"
_COLUMNS = (
    "trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, "
    "status_code, status_description, attributes, resource, events"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT, name TEXT NOT NULL,
    kind TEXT, start_ns INTEGER NOT NULL, end_ns INTEGER, status_code TEXT NOT NULL,
    status_description TEXT, attributes TEXT NOT NULL, resource TEXT NOT NULL,
    events TEXT NOT NULL, PRIMARY KEY (trace_id, span_id));  -- also the trace_id index
CREATE INDEX IF NOT EXISTS spans_start ON spans (start_ns);
"""


def store_path(explicit: Path | None = None) -> Path:
    """The store to use: `explicit`, else env RLM_TRACE_STORE, else DEFAULT_STORE_PATH."""
    if explicit is not None:
        return explicit.expanduser()
    env = os.environ.get(STORE_ENV)
    return Path(env).expanduser() if env else DEFAULT_STORE_PATH


def _row(span: ReadableSpan) -> tuple[Any, ...] | None:
    ctx = span.get_span_context()
    if ctx is None:
        return None
    events = [
        {"name": e.name, "timestamp_ns": e.timestamp, "attributes": dict(e.attributes or {})}
        for e in span.events
    ]
    parent = format(span.parent.span_id, "016x") if span.parent is not None else None
    return (
        format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), parent, span.name,
        span.kind.name, span.start_time or 0, span.end_time, span.status.status_code.name,
        span.status.description, json.dumps(dict(span.attributes or {}), default=str),
        json.dumps(dict(span.resource.attributes), default=str), json.dumps(events, default=str),
    )  # fmt: skip


class SqliteSpanExporter(SpanExporter):
    """Writes finished spans to a SQLite file (created with its schema when missing).

    Thread-safe; never raises from `export`: a database error is logged and reported as FAILURE.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()  # as store_path() does for the reader
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._shut_down = False
        self._last_error = ""

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._shut_down:
                return SpanExportResult.FAILURE
            try:
                rows = [row for row in map(_row, spans) if row is not None]
                conn = self._connection()
                with conn:  # one transaction
                    conn.executemany(
                        f"INSERT OR REPLACE INTO spans ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                        rows,
                    )
            except Exception as exc:  # sqlite3.Error, OSError, ...: never the caller's problem
                message = f"{type(exc).__name__}: {exc}"
                if message != self._last_error:  # once per distinct error, not every batch
                    log.warning("trace store %s: could not write spans: %s", self.path, message)
                self._last_error = message
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                return SpanExportResult.FAILURE
            self._last_error = ""
            return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is committed before it returns

    def shutdown(self) -> None:
        with self._lock:
            self._shut_down = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass(frozen=True)
class StoredSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int | None
    status_code: str  # UNSET, OK or ERROR
    status_description: str | None
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns) if self.end_ns is not None else 0

    @property
    def service(self) -> str | None:
        value = self.resource.get("service.name")
        return str(value) if value is not None else None

    @property
    def is_error(self) -> bool:
        return self.status_code == "ERROR"

    @property
    def is_lm_call(self) -> bool:
        """An LM call: GenAI semantic-convention attributes on a span that is not an rlm.* one."""
        return not self.name.startswith("rlm.") and any(
            k.startswith("gen_ai.") for k in self.attributes
        )


@dataclass(frozen=True)
class TraceSummary:
    trace_id: str
    name: str  # the root span's
    start_ns: int
    duration_ns: int
    span_count: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # the root's rlm.cost_usd, else the sum over LM calls, else None
    error_count: int
    services: tuple[str, ...]

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.start_ns / 1e9, tz=UTC)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, plus `start` (ISO 8601, UTC) and `duration_ms`."""
        data = asdict(self) | {"services": list(self.services)}
        return data | {"start": self.start.isoformat(), "duration_ms": self.duration_ns / 1e6}


def _stored(r: tuple[Any, ...]) -> StoredSpan:
    return StoredSpan(
        trace_id=r[0], span_id=r[1], parent_span_id=r[2], name=r[3], kind=r[4],
        start_ns=r[5], end_ns=r[6], status_code=r[7], status_description=r[8],
        attributes=json.loads(r[9]), resource=json.loads(r[10]), events=json.loads(r[11]),
    )  # fmt: skip


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def roots(spans: Sequence[StoredSpan]) -> list[StoredSpan]:
    """Spans whose parent is not among `spans` (true roots and orphans), earliest first."""
    ids = {s.span_id for s in spans}
    found = [s for s in spans if s.parent_span_id is None or s.parent_span_id not in ids]
    return sorted(found, key=lambda s: (s.start_ns, -s.duration_ns, s.span_id))


def summarize(spans: Sequence[StoredSpan]) -> TraceSummary:
    """The summary of one trace's spans (not empty)."""
    root = roots(spans)[0]
    start = min(s.start_ns for s in spans)
    end = max((s.end_ns or s.start_ns) for s in spans)
    lm_calls = [s for s in spans if s.is_lm_call]

    def total(key: str) -> float:
        return sum(_number(s.attributes.get(key)) or 0.0 for s in lm_calls)

    cost = _number(root.attributes.get("rlm.cost_usd"))
    if cost is None and any("rlm.cost_usd" in s.attributes for s in lm_calls):
        cost = total("rlm.cost_usd")
    services: dict[str, None] = {}
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.service:
            services.setdefault(span.service)
    return TraceSummary(
        trace_id=root.trace_id,
        name=root.name,
        start_ns=start,
        duration_ns=end - start,
        span_count=len(spans),
        input_tokens=int(total("gen_ai.usage.input_tokens")),
        output_tokens=int(total("gen_ai.usage.output_tokens")),
        cost_usd=cost,
        error_count=sum(s.is_error for s in spans),
        services=tuple(services),
    )


class TraceStore:
    """Reads a store written by SqliteSpanExporter. Each call opens its own connection."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TraceStoreError(
                f"no trace store at {self.path} (nothing recorded there yet? "
                f"--store PATH or env {STORE_ENV} chooses another)"
            )

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with closing(sqlite3.connect(self.path, timeout=10.0)) as conn:
                return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise TraceStoreError(f"cannot read trace store {self.path}: {exc}") from exc

    def _trace_ids(self, limit: int) -> list[str]:
        rows = self._query(
            "SELECT trace_id FROM spans GROUP BY trace_id ORDER BY MIN(start_ns) DESC LIMIT ?",
            (limit,),
        )
        return [r[0] for r in rows]

    def traces(self, limit: int = 20) -> list[TraceSummary]:
        """Summaries of the newest `limit` traces, newest first."""
        return [summarize(self.spans(tid)) for tid in self._trace_ids(limit)]

    def spans(self, trace_id: str) -> list[StoredSpan]:
        """The spans of one trace (exact id), by start time; empty when unknown."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM spans WHERE trace_id = ? ORDER BY start_ns, span_id",
            (trace_id,),
        )
        return [_stored(row) for row in rows]

    def trace_ids(self, limit: int = 20) -> list[str]:
        """The newest `limit` trace ids, newest first."""
        return self._trace_ids(limit)

    def last_trace_id(self) -> str | None:
        ids = self._trace_ids(1)
        return ids[0] if ids else None

    def resolve(self, prefix: str) -> str:
        """The trace id that starts with `prefix` (case-insensitive); error if none or several."""
        wanted = prefix.strip().lower()
        if not wanted or any(c not in "0123456789abcdef" for c in wanted):
            raise TraceStoreError(f"not a trace id: {prefix!r} (expected hex digits)")
        rows = self._query(
            "SELECT DISTINCT trace_id FROM spans WHERE substr(trace_id, 1, ?) = ? LIMIT 6",
            (len(wanted), wanted),
        )
        if not rows:
            raise TraceStoreError(f"no trace {prefix!r} in {self.path}")
        if len(rows) > 1:
            shown = ", ".join(r[0] for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise TraceStoreError(f"trace id prefix {prefix!r} is ambiguous: {shown}")
        return str(rows[0][0])
