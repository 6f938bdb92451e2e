"""Metrics (OTLP and Prometheus) and trace export (Chrome trace events, OTLP JSON) of one
scripted completion: 2 turns, 15 concurrent sub-calls (llm_query_batched) and a child RLM.

The completion runs once per module, as a CLI subprocess (the meter and tracer providers are
process-global), exporting its metrics over OTLP/HTTP to a receiver served here and its spans
to a local trace store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import repl, server_config, start_server, stop_server
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider
from trace_export_support import check_trace_events, hex_ids_to_base64
from typer.testing import CliRunner

from rlm_orchestrator.cli import app
from rlm_orchestrator.telemetry import TraceContextFilter
from rlm_orchestrator.telemetry.store import StoredSpan, TraceStore
from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer

SUB_CALLS = 15
ROOT_SCRIPT = [
    repl(
        f"answers = llm_query_batched([f'item {{i}}' for i in range({SUB_CALLS})])\n"
        "child = rlm_query('child context')"
    ),
    "FINAL_VAR(child)",
]
# The child RLM's root model is the sub model: its two turns, after the 15 plain sub-calls.
CHILD_SCRIPT = [repl("r = context.upper()"), "FINAL_VAR(r)"]


def script(lm: ScriptedLMServer) -> None:
    lm.set_sequence("root", ROOT_SCRIPT)
    # Slow enough that the 15 calls overlap in time (they run concurrently).
    lm.add_rule(Rule(r"answer \1", model="sub", regex=r"^item (\d+)$", delay_seconds=0.2))
    lm.set_sequence("sub", CHILD_SCRIPT)


class MetricsReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP endpoint for metrics (protobuf at /v1/metrics), as a Collector serves it."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _MetricsHandler)
        self.requests: list[Any] = []

    def points(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], float]:
        """The last value of each (metric, attributes): sums and gauges their value,
        histograms their count (cumulative temporality: the last export is the total)."""
        found: dict[tuple[str, frozenset[tuple[str, Any]]], float] = {}
        for request in self.requests:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points:
                            attributes = frozenset(
                                (a.key, getattr(a.value, a.value.WhichOneof("value")))
                                for a in point.attributes
                            )
                            if kind == "histogram":
                                value = float(point.count)
                            else:
                                which = point.WhichOneof("value")
                                value = float(getattr(point, which))
                            found[(metric.name, attributes)] = value
        return found


class _MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsReceiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/metrics":
            request = metrics_service_pb2.ExportMetricsServiceRequest()
            request.ParseFromString(body)
            self.server.requests.append(request)
        reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/metrics" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@dataclass
class Run:
    usage: dict[str, Any]  # the completion's usage summary, as `run --json` printed it
    store: Path
    metrics: dict[tuple[str, frozenset[tuple[str, Any]]], float]
    spans: list[StoredSpan]


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("metrics")
    receiver = MetricsReceiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        with ScriptedLMServer() as lm:
            script(lm)
            context = tmp / "context.txt"
            context.write_text("the parent's context")
            store = tmp / "traces.db"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
                "RLM_TRACE_STORE": str(store),
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": (
                    f"http://127.0.0.1:{receiver.server_port}/v1/metrics"
                ),
            }
            command = [
                sys.executable, "-m", "rlm_orchestrator.cli", "run", "-c", str(context),
                "-q", "?", "--model", "root", "--sub-model", "sub", "--api-base", lm.base_url,
                "--max-depth", "2", "--quiet", "--json",
            ]  # fmt: skip
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=120, check=False
            )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["response"] == "CHILD CONTEXT"
        trace_store = TraceStore(store)
        trace_id = trace_store.last_trace_id()
        assert trace_id is not None
        yield Run(result["usage_summary"], store, receiver.points(), trace_store.spans(trace_id))
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join()


def value(run: Run, name: str, **attributes: Any) -> float:
    """The metric's value for exactly these attributes (0 when never recorded)."""
    return run.metrics.get((name, frozenset(attributes.items())), 0.0)


def test_otlp_metrics_count_the_run(scripted_run: Run) -> None:
    run = scripted_run
    assert value(run, "rlm.completions.started") == 1
    assert value(run, "rlm.completions.finished", **{"rlm.outcome": "finished"}) == 1
    assert value(run, "rlm.turns", **{"rlm.depth": 0}) == 2
    assert value(run, "rlm.turns", **{"rlm.depth": 1}) == 2  # the child RLM's
    for depth in (0, 1):
        assert value(run, "rlm.code_blocks", **{"rlm.exec.status": "ok", "rlm.depth": depth}) == 1
    llm = {"rlm.sub_call.kind": "llm_query", "gen_ai.request.model": "sub"}
    assert value(run, "rlm.sub_calls", **llm, **{"rlm.sub_call.ok": True}) == SUB_CALLS
    assert value(run, "rlm.sub_call.duration", **llm) == SUB_CALLS  # the histogram's count
    child = {"rlm.sub_call.kind": "rlm_query", "gen_ai.request.model": "sub"}
    assert value(run, "rlm.sub_calls", **child, **{"rlm.sub_call.ok": True}) == 1
    # Tokens, calls and cost per model: what the usage summary says.
    for model, usage in run.usage["model_usage_summaries"].items():
        m = {"gen_ai.request.model": model}
        assert value(run, "rlm.lm.calls", **m) == usage["total_calls"]
        tokens_in = value(run, "rlm.lm.tokens", **m, **{"gen_ai.token.type": "input"})
        tokens_out = value(run, "rlm.lm.tokens", **m, **{"gen_ai.token.type": "output"})
        assert (tokens_in, tokens_out) == (
            usage["total_input_tokens"],
            usage["total_output_tokens"],
        )
        assert value(run, "rlm.lm.cost_usd", **m) == pytest.approx(usage["total_cost"])
    backend = {"rlm.sandbox.backend": "local"}
    assert value(run, "rlm.sandbox.acquire.duration", **backend) == 2  # parent's and child's
    assert value(run, "rlm.sandboxes.alive", **backend) == 0  # both released


def _chrome(run: Run) -> dict[str, Any]:
    out = run.store.parent / "trace.chrome.json"
    args = ["trace", "export", "--last", "--format", "chrome", "-o", str(out)]
    done = CliRunner().invoke(app, [*args, "--store", str(run.store)])
    assert done.exit_code == 0, done.output
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def test_chrome_export_loads_with_every_span_and_correct_nesting(scripted_run: Run) -> None:
    spans = scripted_run.spans
    document = _chrome(scripted_run)
    check_trace_events(document, spans)
    complete = [e for e in document["traceEvents"] if e["ph"] == "X"]
    agents = {s.resource.get("process.pid") for s in spans if s.service == "rlm-sandbox-agent"}
    assert len(agents) == 2  # the root's sandbox and the child RLM's
    # The 15 sub-calls overlap in time, each on a row of its own.
    subs = [e for e in complete if e["name"] == "chat sub" and e["args"].get("rlm.depth") == 1]
    assert len(subs) == SUB_CALLS
    assert max(e["ts"] for e in subs) < min(e["ts"] + e["dur"] for e in subs)
    assert len({(e["pid"], e["tid"]) for e in subs}) == SUB_CALLS
    assert sum(e["name"] == "rlm.turn" for e in complete) == 4  # 2 of the root, 2 of the child
    assert sum(e["name"] == "rlm.completion" for e in complete) == 2


def test_otlp_json_export_parses_as_an_export_request(scripted_run: Run) -> None:
    args = ["trace", "export", "--last", "--format", "otlp-json"]
    done = CliRunner().invoke(app, [*args, "--store", str(scripted_run.store)])
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    request = json_format.Parse(
        json.dumps(hex_ids_to_base64(document)), trace_service_pb2.ExportTraceServiceRequest()
    )
    parsed = [
        (span, resource)
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_id = {span.span_id.hex(): (span, resource) for span, resource in parsed}
    assert set(by_id) == {s.span_id for s in scripted_run.spans}
    for stored in scripted_run.spans:
        span, resource = by_id[stored.span_id]
        assert span.trace_id.hex() == stored.trace_id and span.name == stored.name
        assert span.parent_span_id.hex() == (stored.parent_span_id or "")
        assert (span.start_time_unix_nano, span.end_time_unix_nano) == (
            stored.start_ns,
            stored.end_ns,
        )
        service = {a.key: a.value.string_value for a in resource.resource.attributes}
        assert service["service.name"] == stored.service
        attributes = {a.key: a.value for a in span.attributes}
        for key, expected in stored.attributes.items():
            got = attributes[key]
            kind = got.WhichOneof("value")
            if kind == "array_value":
                assert [v.string_value for v in got.array_value.values] == list(expected)
            else:
                assert getattr(got, kind) == expected, key


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_serve_has_a_prometheus_endpoint(lm: ScriptedLMServer, tmp_path: Path) -> None:
    port = _free_port()
    config = server_config(lm, tmp_path, metrics_listen=f"127.0.0.1:{port}", max_depth=2)
    # A warm pool of one: the completion's sandbox comes from it (a hit).
    config.write_text("environment_kwargs = { warm_pool_size = 1 }\n" + config.read_text())
    server = start_server(config)
    try:
        script(lm)
        with server.client() as client:
            result = client.completion("the parent's context", "?", max_depth=2)
        assert result.response == "CHILD CONTEXT"
        samples = _scrape(port)
        deadline = time.monotonic() + 30
        while _pool_size(samples) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # the pool refills behind each take
            samples = _scrape(port)
    finally:
        stop_server(server)

    def sample(name: str, **labels: str) -> float:
        """The sample of the series with these labels (and the exporter's otel_scope_*);
        0 when there is no such series."""
        found = [v for (n, have), v in samples.items() if n == name and _has(have, labels)]
        assert len(found) <= 1, (name, labels)
        return found[0] if found else 0.0

    assert sample("rlm_completions_started_total") == 1
    assert sample("rlm_completions_finished_total", rlm_outcome="finished") == 1
    assert sample("rlm_lm_cost_usd_total", gen_ai_request_model="sub") == 0.0
    assert sample("rlm_turns_total", rlm_depth="0") == 2
    llm = {"rlm_sub_call_kind": "llm_query", "gen_ai_request_model": "sub"}
    assert sample("rlm_sub_calls_total", **llm, rlm_sub_call_ok="true") == SUB_CALLS
    assert sample("rlm_sub_call_duration_seconds_count", **llm) == SUB_CALLS
    usage = result.usage_summary.model_usage_summaries
    tokens = {"gen_ai_request_model": "root", "gen_ai_token_type": "input"}
    assert sample("rlm_lm_tokens_total", **tokens) == usage["root"].total_input_tokens
    local = {"rlm_sandbox_backend": "local"}
    # The parent's sandbox came from the pool; the child's too if the refill was done by then.
    hits = sample("rlm_sandbox_warm_pool_requests_total", **local, result="hit")
    misses = sample("rlm_sandbox_warm_pool_requests_total", **local, result="miss")
    assert hits >= 1 and hits + misses == 2
    assert _pool_size(samples) == 1
    assert sample("rlm_sandboxes_alive", **local) == 0
    assert sample("rlm_sandbox_acquire_duration_seconds_count", **local) == 2


def _has(have: frozenset[tuple[str, str]], labels: dict[str, str]) -> bool:
    return {k: v for k, v in have if not k.startswith("otel_scope_")} == labels


def _pool_size(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
    name, local = "rlm_sandbox_warm_pool_size", {"rlm_sandbox_backend": "local"}
    return sum(v for (n, have), v in samples.items() if n == name and _has(have, local))


def test_log_records_carry_the_trace_and_span_ids(caplog: pytest.LogCaptureFixture) -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    log = logging.getLogger("rlm_orchestrator.test_metrics")
    handler = logging.Handler()
    seen: list[logging.LogRecord] = []
    handler.emit = seen.append  # type: ignore[method-assign]
    handler.addFilter(TraceContextFilter())
    log.addHandler(handler)
    try:
        with provider.get_tracer("test").start_as_current_span("work") as span:
            log.warning("inside")
        log.warning("outside")
    finally:
        log.removeHandler(handler)
        provider.shutdown()
    context = span.get_span_context()
    inside, outside = seen
    assert inside.trace_id == format(context.trace_id, "032x")  # type: ignore[attr-defined]
    assert inside.span_id == format(context.span_id, "016x")  # type: ignore[attr-defined]
    assert (outside.trace_id, outside.span_id) == ("-", "-")  # type: ignore[attr-defined]
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_export_of_a_recorded_trace_and_its_refusals(tmp_path: Path) -> None:
    from test_trace_store import _record_completion

    db = tmp_path / "traces.db"
    trace_id = _record_completion(db)
    spans = TraceStore(db).spans(trace_id)
    runner = CliRunner()
    done = runner.invoke(app, ["trace", "export", trace_id[:8], "--store", str(db)])
    assert done.exit_code == 0, done.output
    check_trace_events(json.loads(done.stdout), spans)
    bad = runner.invoke(app, ["trace", "export", "--last", "-f", "svg", "--store", str(db)])
    assert bad.exit_code == 1 and "chrome, otlp-json" in bad.output
    neither = runner.invoke(app, ["trace", "export", "--store", str(db)])
    assert neither.exit_code == 1 and "TRACE_ID or --last" in neither.output


def test_a_metrics_listen_that_cannot_be_served_is_a_configuration_error() -> None:
    from pydantic import ValidationError

    from rlm_orchestrator.exceptions import ConfigurationError
    from rlm_orchestrator.service.settings import ServerSettings
    from rlm_orchestrator.telemetry import metrics

    with pytest.raises(ValidationError):
        ServerSettings(metrics_listen="9464")  # no host:port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigurationError, match="metrics_listen"):
            metrics._prometheus(f"127.0.0.1:{busy.getsockname()[1]}")
