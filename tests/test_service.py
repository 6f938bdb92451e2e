"""The orchestrator server over real gRPC: concurrency, cancel, auth, TLS, limits, shutdown.

The shared server is a real `rlm-orchestrator serve` subprocess (conftest); the semantics
suite also runs through it (the [server] variants of tests/test_semantics*.py).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import (
    SERVER_TOKEN,
    SUB_MODEL,
    ServerProcess,
    _agent_processes,
    repl,
    server_config,
    start_server,
    stop_server,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rlm_orchestrator import CostLimitExceededError, LMError
from rlm_orchestrator import events as ev
from rlm_orchestrator.client import AsyncClient, Client
from rlm_orchestrator.exceptions import (
    AuthenticationError,
    InvalidRequestError,
    ResourceExhaustedError,
    ServerUnavailableError,
)
from rlm_orchestrator.sandbox import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.limits import SandboxLimitError, SandboxPool
from rlm_orchestrator.service.admission import RequestRefused, request_limits
from rlm_orchestrator.service.event_buffer import EventBuffer
from rlm_orchestrator.service.server import OrchestratorServer
from rlm_orchestrator.service.settings import ServerSettings, load_server_settings
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer
from rlm_wire.auth import bearer_metadata
from rlm_wire.v1 import orchestrator_pb2 as pb
from rlm_wire.v1 import orchestrator_pb2_grpc, usage_pb2
from tests.fakes.certs import make_test_pki

ANSWER_IN_CODE = repl("answer = context.upper()\nFINAL_VAR('answer')")


def test_completion_and_usage_through_the_sdk(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.set_sequence("root", [repl("x = llm_query('hi')\nprint(x)"), "FINAL_VAR(x)"])
    lm.set_sequence(SUB_MODEL, ["hello from sub"])
    with orchestrator_server.client() as client:
        result = client.completion("context", "question?")
    assert result.response == "hello from sub"
    assert result.usage_summary.model_usage_summaries["root"].total_calls == 2
    assert result.usage_summary.model_usage_summaries[SUB_MODEL].total_calls == 1
    # The server's key went to the LM; no client sent one.
    assert lm.requests_for("root")[0].api_key == "sk-orchestrator-secret-openai"


async def test_32_concurrent_completions_get_their_own_answers(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule(ANSWER_IN_CODE, model="root"))
    async with AsyncClient(orchestrator_server.address, token=SERVER_TOKEN) as client:
        results = await asyncio.gather(
            *(client.completion(f"context number {i}") for i in range(32))
        )
    assert [r.response for r in results] == [f"CONTEXT NUMBER {i}" for i in range(32)]


async def test_cancel_stops_one_completion_and_its_sandbox_only(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    def reply(request: RecordedRequest) -> str:
        if "slow" in request.messages[1]["content"] or "slow" in str(request.messages):
            return repl("import time\ntime.sleep(120)")
        return ANSWER_IN_CODE

    lm.add_rule(Rule(reply, model="root"))
    async with AsyncClient(orchestrator_server.address, token=SERVER_TOKEN) as client:
        before = _agent_processes()
        events: list[ev.StreamEvent] = []
        started = asyncio.Event()
        block_running = asyncio.Event()

        async def slow() -> None:
            async for event in client.stream("slow", root_prompt="slow"):
                events.append(event)
                if isinstance(event, ev.CompletionStarted):
                    started.set()
                if isinstance(event, ev.CodeBlockStarted):
                    block_running.set()

        slow_task = asyncio.create_task(slow())
        await asyncio.wait_for(block_running.wait(), 60)
        slow_sandbox = _agent_processes() - before
        assert slow_sandbox, "the slow completion's sandbox should be running"
        others = [asyncio.create_task(client.completion(f"other {i}")) for i in range(2)]
        completion_id = next(e for e in events if isinstance(e, ev.CompletionStarted)).completion_id
        assert completion_id in [c.completion_id for c in await client.list_completions()]
        assert (await client.get_completion(completion_id)).iterations == 1
        # Each turn says the time left (the server's default limit is 3600 s).
        turn = next(e for e in events if isinstance(e, ev.TurnStarted))
        assert turn.seconds_left is not None and 3000 < turn.seconds_left <= 3600
        await client.cancel(completion_id)
        await asyncio.wait_for(slow_task, 30)
        assert isinstance(events[-1], ev.CompletionFailed) and events[-1].kind == "cancelled"
        deadline = time.monotonic() + 10
        while slow_sandbox & _agent_processes() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert not slow_sandbox & _agent_processes()
        assert [r.response for r in await asyncio.gather(*others)] == ["OTHER 0", "OTHER 1"]
        with pytest.raises(InvalidRequestError, match="NOT_FOUND"):
            await client.cancel(completion_id)


def test_calls_without_the_token_are_unauthenticated(orchestrator_server: ServerProcess) -> None:
    for token in (None, "wrong-token"):
        with (
            Client(orchestrator_server.address, token=token) as client,
            pytest.raises(AuthenticationError, match="UNAUTHENTICATED"),
        ):
            client.completion("ctx")


def test_health_and_reflection_answer_without_a_token(orchestrator_server: ServerProcess) -> None:
    with grpc.insecure_channel(orchestrator_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"rlm.v1.Orchestrator", "rlm.v1.LMRouter", "grpc.health.v1.Health"} <= services


async def test_tls_server_refuses_plaintext_and_serves_tls_clients(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    pki = make_test_pki(tmp_path)
    config = server_config(lm, tmp_path)
    with config.open("a") as toml:
        toml.write(f'[tls]\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n')
    server = OrchestratorServer(load_server_settings(config))
    port = await server.start()
    try:
        lm.add_rule(Rule(ANSWER_IN_CODE, model="root"))
        async with AsyncClient(f"localhost:{port}", token=SERVER_TOKEN, ca_file=pki.ca_cert) as tls:
            assert (await tls.completion("secure")).response == "SECURE"
        async with AsyncClient(f"localhost:{port}", token=SERVER_TOKEN) as plaintext:
            with pytest.raises(ServerUnavailableError):
                await plaintext.completion("not secure")
    finally:
        await server.stop()


async def test_50_mb_context_round_trips(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule(repl("n = (len(context), context[-5:])\nFINAL_VAR('n')"), model="root"))
    context = "x" * (50 * 1024 * 1024) + "TAIL!"
    async with AsyncClient(orchestrator_server.address, token=SERVER_TOKEN) as client:
        result = await client.completion(context)
    assert result.response == f"({len(context)}, 'TAIL!')"


async def raw_run_or_raise(server: ServerProcess, *messages: pb.RunRequest) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)

        async def requests() -> AsyncIterator[pb.RunRequest]:
            for message in messages:
                yield message

        async for _ in stub.Run(requests(), metadata=bearer_metadata(SERVER_TOKEN)):
            pass


async def raw_run(server: ServerProcess, *messages: pb.RunRequest) -> grpc.StatusCode:
    try:
        await raw_run_or_raise(server, *messages)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_malformed_and_oversized_requests_are_refused_and_the_server_keeps_serving(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    text = pb.CONTEXT_ENCODING_TEXT
    chunk_first = pb.RunRequest(context_chunk=b"abc")
    assert await raw_run(orchestrator_server, chunk_first) == grpc.StatusCode.INVALID_ARGUMENT
    too_big = pb.RunRequest(
        start=pb.CompletionStart(context_encoding=text, context_bytes=200_000_000)
    )
    assert await raw_run(orchestrator_server, too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    huge_message = pb.RunRequest(context_chunk=b"y" * (20 * 1024 * 1024))
    start = pb.RunRequest(
        start=pb.CompletionStart(context_encoding=text, context_bytes=20 * 1024 * 1024)
    )
    assert (
        await raw_run(orchestrator_server, start, huge_message)
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    short = pb.RunRequest(start=pb.CompletionStart(context_encoding=text, context_bytes=10))
    assert (
        await raw_run(orchestrator_server, short, chunk_first) == grpc.StatusCode.INVALID_ARGUMENT
    )
    bad_json = pb.RunRequest(
        start=pb.CompletionStart(context_encoding=pb.CONTEXT_ENCODING_JSON, context_bytes=3)
    )
    assert (
        await raw_run(orchestrator_server, bad_json, chunk_first)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    async with AsyncClient(orchestrator_server.address, token=SERVER_TOKEN) as client:
        with pytest.raises(InvalidRequestError, match="unknown model"):
            await client.completion("ctx", model="no-such-model")
        with pytest.raises(InvalidRequestError, match="unknown completion options"):
            await client.completion("ctx", temperature=0.3)
        lm.add_rule(Rule(ANSWER_IN_CODE, model="root"))
        assert (await client.completion("still serving")).response == "STILL SERVING"


async def test_refusals_say_what_was_wrong(orchestrator_server: ServerProcess) -> None:
    text = pb.CONTEXT_ENCODING_TEXT
    metadata = bearer_metadata(SERVER_TOKEN)

    async def refused(*messages: pb.RunRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw_run_or_raise(orchestrator_server, *messages)
        return caught.value.code(), caught.value.details()

    chunk = pb.RunRequest(context_chunk=b"abc")
    assert await refused(chunk) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the first message must be `start`",
    )
    bad_encoding = pb.RunRequest(start=pb.CompletionStart(context_bytes=3))
    assert await refused(bad_encoding) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "context_encoding must be TEXT or JSON",
    )
    short = pb.RunRequest(start=pb.CompletionStart(context_encoding=text, context_bytes=2))
    assert await refused(short, chunk) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "more context than the 2 bytes announced",
    )
    in_session = pb.RunRequest(
        start=pb.CompletionStart(context_encoding=text, context_bytes=3, session_id="nope")
    )
    assert await refused(in_session) == (grpc.StatusCode.NOT_FOUND, "no session 'nope'")
    async with grpc.aio.insecure_channel(orchestrator_server.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        # An empty id is no session either (it used to fail an assertion: UNKNOWN).
        for session_id in ("", "nope"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                request = pb.CloseSessionRequest(session_id=session_id)
                await stub.CloseSession(request, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert caught.value.details() == f"no session {session_id!r}"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            request = pb.GetCompletionRequest(completion_id="c")
            await stub.GetCompletion(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "no running completion 'c'"


def test_child_rlm_cost_counts_against_max_cost_through_the_server(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    def child(request: RecordedRequest) -> str:
        first_turn = len(request.messages) == 3
        return repl("r = context.upper()") if first_turn else "FINAL_VAR(r)"

    lm.add_rule(Rule(child, model=SUB_MODEL))
    lm.set_sequence("root", [repl("a = rlm_query('child question')"), "FINAL_VAR(a)"] * 2)
    with orchestrator_server.client() as client:
        result = client.completion("ctx", max_depth=2)
        assert result.response == "CHILD QUESTION"
        assert result.usage_summary.model_usage_summaries[SUB_MODEL].total_calls == 2
        with pytest.raises(CostLimitExceededError) as caught:
            client.completion("ctx", max_depth=2, sub_model="priced-sub", max_cost=0.5)
    assert caught.value.usage_summary is not None
    assert caught.value.usage_summary.model_usage_summaries["priced-sub"].total_cost > 0.5


def test_lm_errors_retry_then_surface_clearly(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.set_sequence(
        "root", [Rule("slow down", status=429), repl("print(llm_query('q'))"), "FINAL(done)"]
    )
    lm.add_rule(Rule("provider down", model=SUB_MODEL, status=500))
    with orchestrator_server.client() as client:
        assert client.completion("ctx").response == "done"
        shown = str(lm.requests_for("root")[-1].messages)
        assert "Error: LM call to 'sub' failed (HTTP 500)" in shown
        lm.reset()
        lm.add_rule(Rule("root down", model="root", status=500))
        with pytest.raises(LMError, match="HTTP 500") as caught:
            client.completion("ctx")
    assert caught.value.status_code == 500


def test_sessions_keep_variables_between_completions(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.set_sequence(
        "root", [repl("kept = 41"), "FINAL(one)", repl("print(kept + 1, context_1)"), "FINAL(two)"]
    )
    with orchestrator_server.client() as client, client.create_session() as session:
        assert session.completion("first").response == "one"
        assert session.completion("second").response == "two"
    assert "42 second" in str(lm.requests_for("root")[3].messages)


def test_sigterm_during_a_completion_exits_within_the_grace_and_leaks_nothing(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    grace, margin = 1.0, 10.0  # wide: the exit takes ~2 s; a grace stretched by 20 s is not
    server = start_server(server_config(lm, tmp_path, shutdown_grace_seconds=grace))
    try:
        lm.add_rule(Rule(repl("import time\ntime.sleep(120)"), model="root"))
        events: list[ev.StreamEvent] = []
        signalled = failed_at = 0.0
        with server.client() as client:
            # A reading client gets the completion's last event: no UNAVAILABLE is tolerated.
            for event in client.stream("ctx"):
                events.append(event)
                if isinstance(event, ev.CodeBlockStarted):
                    server.process.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
                if isinstance(event, ev.CompletionFailed):
                    failed_at = time.monotonic()
        last = events[-1]
        assert isinstance(last, ev.CompletionFailed), f"the stream ended with {last!r}"
        assert last.kind == "server_shutdown", last
        assert last.limit == grace and "shutdown grace period" in last.message, last
        # The completion had its grace (the server got the signal after it was sent) ...
        assert failed_at - signalled >= grace
        # ... and the server then exited; the leak check finds no sandbox left.
        try:
            server.process.wait(max(0.0, signalled + grace + margin - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {grace + margin:g}s of SIGTERM")
        assert server.process.returncode == 0
    finally:
        stop_server(server)


def test_resource_limits_are_reported(orchestrator_server: ServerProcess) -> None:
    with orchestrator_server.client() as client, pytest.raises(ResourceExhaustedError):
        client.completion("z" * 101_000_000)


# -- the pieces that keep tenants apart (unit level; the attacks are in test_hostile.py) ---------


async def test_event_buffer_drops_output_with_a_marker_and_keeps_what_matters() -> None:
    buffer = EventBuffer(max_bytes=64 * 1024)
    chunk = pb.CompletionEvent(
        output=pb.CompletionOutput(block=3, stream="stdout", text="x" * 9000)
    )
    for _ in range(20):  # 180 KB of output into a 64 KiB buffer
        buffer.put(chunk)
        buffer.put(pb.CompletionEvent(sub_call_started=pb.SubCallStarted(call_id=1)))
    for cost in (1.0, 2.0):  # usage is cumulative: the newer replaces one still waiting
        usage = usage_pb2.UsageSummary(total_cost=cost)
        buffer.put(pb.CompletionEvent(usage=pb.UsageUpdate(usage=usage)))
    buffer.put(pb.CompletionEvent(finished=pb.CompletionFinished(response="done")))
    buffer.close()
    assert buffer.buffered_bytes <= 64 * 1024 + 1024
    events = []
    while (event := await buffer.get()) is not None:
        events.append(event)
    kept = [e.output for e in events if e.HasField("output") and not e.output.dropped_chars]
    [marker] = [e.output for e in events if e.HasField("output") and e.output.dropped_chars]
    assert len(kept) * 9000 + marker.dropped_chars == 20 * 9000
    assert marker.block == 3 and "the server dropped" in marker.text
    assert marker.dropped_events == 20 - sum(e.HasField("sub_call_started") for e in events)
    usages = [e.usage.usage.total_cost for e in events if e.HasField("usage")]
    assert usages == [2.0]
    assert events[-1].finished.response == "done"


async def test_event_buffer_answer_parts_wait_for_room() -> None:
    buffer = EventBuffer(max_bytes=64 * 1024)
    part = pb.CompletionEvent(answer_part=pb.AnswerPart(text="a" * 40_000))
    await buffer.put_waiting(part)
    second = asyncio.create_task(buffer.put_waiting(part))
    await asyncio.sleep(0.05)
    assert not second.done()  # no room until the reader takes the first
    assert await buffer.get() == part
    await asyncio.wait_for(second, 5)
    assert await buffer.get() == part


class _CountingProvider:
    name = "counting"

    def __init__(self) -> None:
        self.live = 0

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        self.live += 1
        return Sandbox(spec.session_id, None, spec)  # type: ignore[arg-type]

    async def release(self, sandbox: Sandbox) -> None:
        self.live -= 1

    async def aclose(self) -> None:
        return None


async def test_sandbox_pool_counts_reserved_slots_and_children() -> None:
    provider = _CountingProvider()
    pool = SandboxPool(provider, limit=3)
    spec = SandboxSpec(session_id="s")
    slot = pool.reserve()
    assert slot is not None and pool.in_use == 1
    view = pool.view(slot)
    own = await view.acquire(spec)  # on the reserved slot
    children = [await view.acquire(spec), await view.acquire(spec)]
    assert pool.in_use == 3 and pool.reserve() is None
    with pytest.raises(SandboxLimitError, match="max_sandboxes=3"):
        await view.acquire(spec)
    await view.release(children.pop())
    assert pool.in_use == 2
    pool.close(slot)  # the holder ended before its sandbox was released: still counted
    assert pool.in_use == 2
    await pool.release(own)
    await pool.release(children.pop())
    assert pool.in_use == 0 and provider.live == 0


def test_request_limits_take_defaults_and_refuse_above_ceilings() -> None:
    settings = ServerSettings(max_depth=2, default_max_depth=1, max_cost=5.0)
    limits = request_limits(pb.CompletionOptions(), settings)
    assert (limits.max_depth, limits.max_cost, limits.timeout_seconds) == (1, 5.0, 3600.0)
    assert request_limits(pb.CompletionOptions(max_depth=2), settings).max_depth == 2
    with pytest.raises(
        RequestRefused, match="max_depth=3 is above the server's ceiling max_depth=2"
    ):
        request_limits(pb.CompletionOptions(max_depth=3), settings)
    with pytest.raises(ValueError, match="default_max_depth=3 is above its ceiling"):
        ServerSettings(max_depth=2, default_max_depth=3)
