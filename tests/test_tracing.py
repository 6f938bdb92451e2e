"""One trace per completion, across processes, received by a real OTLP collector service.

Each traced run is a CLI subprocess (a tracer provider is process-global): it exports over
OTLP/gRPC to the receiver this test serves, and to a local SQLite store read back by
`rlm-orchestrator trace`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import SERVER_TOKEN, repl, require_docker, server_config, start_server, stop_server
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from typer.testing import CliRunner

from rlm_orchestrator.cli import app
from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer
from rlm_wire.auth import bearer_metadata
from rlm_wire.v1 import orchestrator_pb2 as pb
from rlm_wire.v1 import orchestrator_pb2_grpc


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's trace service, as the OpenTelemetry Collector serves it."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []

    def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {
                        a.key: getattr(a.value, a.value.WhichOneof("value"))
                        for a in span.attributes
                    }
                    self.spans.append(
                        ReceivedSpan(
                            resource.get("service.name", ""),
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            attributes,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def traced_cli_run(lm: ScriptedLMServer, tmp_path: Path, port: int, *extra: str) -> Path:
    lm.set_sequence(
        "root", [repl("answers = llm_query_batched(['a', 'b', 'c'])"), "FINAL_VAR(answers)"]
    )
    lm.add_rule(Rule(r"answer \1", model="sub", regex=r"^(\w)$"))
    context_file = tmp_path / "context.txt"
    context_file.write_text("a traced context")
    store = tmp_path / "traces.db"
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "RLM_TRACE_STORE": str(store),
    }
    command = [
        sys.executable,
        "-m",
        "rlm_orchestrator.cli",
        "run",
        "-c",
        str(context_file),
        "-q",
        "?",
        "--model",
        "root",
        "--sub-model",
        "sub",
        "--api-base",
        lm.base_url,
        "--quiet",
        *extra,
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['answer a', 'answer b', 'answer c']"
    return store


def check_one_trace(spans: list[ReceivedSpan]) -> None:
    assert len({s.trace_id for s in spans}) == 1, "exactly one trace"
    by_id = {s.span_id: s for s in spans}

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        return by_id[span.parent_span_id]

    (root,) = [s for s in spans if not s.parent_span_id]
    assert root.name == "rlm.completion" and root.service == "rlm-orchestrator"
    assert (root.attributes["rlm.iterations"], root.attributes["rlm.final_source"]) == (
        2,
        "final_var",
    )
    turns = [s for s in spans if s.name == "rlm.turn"]
    assert len(turns) == 2 and all(parent(t) is root for t in turns)
    root_calls = [s for s in spans if s.name == "chat root"]
    assert len(root_calls) == 2 and all(parent(c).name == "rlm.turn" for c in root_calls)
    assert all(c.attributes["gen_ai.usage.input_tokens"] > 0 for c in root_calls)
    (execute,) = [s for s in spans if s.name == "rlm.execute"]
    assert parent(execute).name == "rlm.turn"
    (agent,) = [s for s in spans if s.name == "sandbox.execute"]
    assert parent(agent) is execute and agent.service == "rlm-sandbox-agent"
    sub_calls = [s for s in spans if s.name == "chat sub"]
    assert len(sub_calls) == 3 and all(parent(c) is agent for c in sub_calls)
    assert all(c.attributes["gen_ai.usage.output_tokens"] > 0 for c in sub_calls)
    assert any(s.name == "rlm.sandbox.create" and parent(s) is root for s in spans)


def test_one_trace_across_orchestrator_and_agent(
    lm: ScriptedLMServer, tmp_path: Path, receiver: tuple[Receiver, int]
) -> None:
    collector, port = receiver
    store = traced_cli_run(lm, tmp_path, port)
    check_one_trace(collector.spans)
    # The local store has the same trace, and `trace show --last` prints its tree.
    runner = CliRunner()
    shown = runner.invoke(app, ["trace", "show", "--last", "--store", str(store)])
    assert shown.exit_code == 0, shown.output
    assert "rlm.completion" in shown.stdout and "sandbox.execute" in shown.stdout
    as_json = runner.invoke(app, ["trace", "show", "--last", "--json", "--store", str(store)])
    tree = json.loads(as_json.stdout)
    assert tree


@pytest.mark.docker
def test_one_trace_with_a_docker_sandbox(
    lm: ScriptedLMServer, tmp_path: Path, receiver: tuple[Receiver, int]
) -> None:
    require_docker()
    collector, port = receiver
    traced_cli_run(lm, tmp_path, port, "--environment", "docker")
    check_one_trace(collector.spans)


def test_tracing_off_creates_no_thread_and_no_file(lm: ScriptedLMServer, tmp_path: Path) -> None:
    lm.set_sequence("root", [repl("x = llm_query('a')"), "FINAL_VAR(x)"])
    lm.set_sequence("sub", ["fine"])
    script = f"""
import threading, os
from rlm_orchestrator import RLM, telemetry
kwargs = {{"api_base": {lm.base_url!r}, "api_key": "k"}}
rlm = RLM(backend_kwargs={{"model_name": "root", **kwargs}}, other_backends=["openai"],
          other_backend_kwargs=[{{"model_name": "sub", **kwargs}}])
print(rlm.completion("ctx").response, telemetry.enabled())
print(sorted(t.name for t in threading.enumerate()))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RLM_TRACE"))}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    first, threads = done.stdout.strip().splitlines()[-2:]
    assert first == "fine False"
    assert "Span" not in threads and "Otel" not in threads, threads
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".db"]


def test_a_server_completion_continues_the_callers_trace(
    lm: ScriptedLMServer,
    tmp_path: Path,
    receiver: tuple[Receiver, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector, port = receiver
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    server = start_server(server_config(lm, tmp_path))  # inherits the OTEL_* variables
    try:
        lm.set_sequence("root", [repl("x = llm_query('q')"), "FINAL_VAR(x)"])
        lm.set_sequence("sub", ["traced"])
        caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        traceparent = f"00-{caller_trace}-{caller_span}-01"
        with grpc.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            data = b"ctx"
            start = pb.CompletionStart(context_encoding=pb.CONTEXT_ENCODING_TEXT, context_bytes=3)
            requests = iter([pb.RunRequest(start=start), pb.RunRequest(context_chunk=data)])
            metadata = (*bearer_metadata(SERVER_TOKEN), ("traceparent", traceparent))
            events = list(stub.Run(requests, metadata=metadata))
        assert events[-1].finished.response == "traced"
    finally:
        stop_server(server)  # SIGTERM: the server flushes its spans on the way out
    assert {s.trace_id for s in collector.spans} == {caller_trace}
    by_id = {s.span_id: s for s in collector.spans}
    (completion,) = [s for s in collector.spans if s.name == "rlm.completion"]
    rpc = by_id[completion.parent_span_id]
    assert rpc.name == "/rlm.v1.Orchestrator/Run" and rpc.parent_span_id == caller_span
    assert any(s.name == "sandbox.execute" for s in collector.spans)
