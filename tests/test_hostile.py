"""Hostile sandboxes, hostile clients (issue 13): each test is the attack, then the proof that
nothing was lost (the victim's answer intact, the orchestrator alive and answering) and
nothing leaked (no process, container, socket or directory left: the autouse leak check).

One test (or more) per finding, in four modules:
- here: 1 (output flood: raw frames past the cap, a stalled client) and 8 (big answers);
- test_hostile_isolation.py: 2 (a local sandbox reaching others and the orchestrator),
  3 (forked children, fork bombs, memory) and 7 (a sandbox tied to a thread);
- test_hostile_docker.py: 6 (the socket directory, orphaned containers);
- test_hostile_tenants.py: 4 (limits against one token holder), 5 (anonymous callers) and
  9 (undecodable messages, shutdown).
Shared attacks and helpers: hostile_support.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from conftest import (
    ROOT_MODEL,
    SERVER_TOKEN,
    ServerProcess,
    repl,
)
from hostile_support import (
    ANSWER_IN_CODE,
    BACKENDS,
    CAP,
    FIND_FRAME_FD,
    FLOOD,
    MB,
    RSSSampler,
    acquired,
    current_rss,
    root_messages,
    run_block,
    still_answers,
    until,
)

from rlm_orchestrator import RLM, AnswerTooLargeError, SandboxError
from rlm_orchestrator import events as ev
from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.exceptions import (
    ResourceExhaustedError,
)
from rlm_orchestrator.sandbox import (
    SubCallOutcome,
)
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer
from rlm_wire.auth import bearer_metadata
from rlm_wire.v1 import orchestrator_pb2 as pb
from rlm_wire.v1 import orchestrator_pb2_grpc, sandbox_pb2_grpc
from rlm_wire.v1 import sandbox_pb2 as sandbox_pb
from sandbox_agent.limits import (
    MAX_PENDING_PROMPTS,
    MAX_PENDING_REQUESTS,
    ORCHESTRATOR_OUTPUT_SLACK,
)

# -- finding 1: output cap enforced inside the attacker's process ---------------------------------


@pytest.mark.parametrize("via", BACKENDS, indirect=True)
def test_raw_frame_flood_is_capped_by_the_agent_and_the_orchestrator(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer, via: str
) -> None:
    received = {"stdout": 0, "stderr": 0}

    def count(event: ev.Event) -> None:
        if isinstance(event, ev.OutputChunk):
            received[event.stream] += len(event.text)

    import litellm  # noqa: F401  # its ~200 MB are part of the baseline, not of the attack

    warm = make_rlm(root=[repl("kept = 1\nprint(kept)"), "FINAL(warm)"], on_event=count)
    assert warm.completion("ctx").response == "warm"
    received.update(stdout=0, stderr=0)
    first = len(lm.requests_for(ROOT_MODEL))  # the turns of the attack come after these
    baseline = current_rss()
    rlm = make_rlm(
        root=[repl("kept = 1"), repl(FLOOD), repl("print('still here', 6 * 7)"), "FINAL(ok)"],
        on_event=count,
    )
    with RSSSampler(os.getpid()) as rss:
        result = rlm.completion("the context")
    growth_mb = (rss.peak - baseline) / MB
    assert result.response == "ok"  # the completion finished
    # What the orchestrator kept: at most the cap (+ room for the markers) per stream.
    for stream in ("stdout", "stderr"):
        assert 0 < received[stream] <= CAP + ORCHESTRATOR_OUTPUT_SLACK, received
    shown = root_messages(lm, first + 2)
    assert len(shown) < 100_000  # the model sees its usual 20,000 characters per block
    assert "the sandbox broke its protocol" in shown
    assert "past its cap of 1000000 per stream" in shown
    assert "all variables were lost" in shown  # and it is told that the worker was replaced
    assert "flood over" not in shown  # the worker was killed mid-flood
    assert "still here 42" in root_messages(lm, first + 3)  # the next block runs in a new worker
    assert growth_mb < 100, f"orchestrator RSS grew by {growth_mb:.0f} MB"


GARBAGE = {
    # A header announcing a 2 GiB frame: rejected before anything is read or allocated.
    "huge header": 'os.write(FD, struct.pack(">IB", 2**31, ord("o")))',
    "unknown kind": 'os.write(FD, frame("Z", b"hello"))',
    "oversized output frame": 'os.write(FD, frame("o", b"x" * (2 << 20)))',
    "DONE that does not parse": 'os.write(FD, frame("d", b"{not json"))',
    # Well formed but for one number, which would not fit the uint64 it becomes.
    "DONE with a bad field": (
        "import json\nos.write(FD, frame('d', json.dumps({'status': 'ok', 'error': '', "
        "'stdout_chars': 0, 'stderr_chars': 0, 'truncated_chars': 2**70, 'variables': [], "
        "'variables_omitted': 0, 'duration': 0.1, 'final_answer_chars': None}).encode()))"
    ),
    "reply out of turn": 'os.write(FD, frame("l", b\'{"type_name":"str","length":1}\'))',
    "request that does not parse": 'os.write(FD, frame("q", b\'{"id":1,"prompts":"x"}\'))',
    "output that is not UTF-8": 'os.write(FD, frame("o", b"\\xff\\xfe"))',
}
GARBAGE_REASONS = {
    "huge header": "announced a STDOUT frame of 2147483648 bytes",
    "unknown kind": "unknown kind 0x5a",
    "oversized output frame": "announced a STDOUT frame of 2097152 bytes",
    "DONE that does not parse": "DONE frame that does not parse",
    "DONE with a bad field": "'truncated_chars' is not a count",
    "reply out of turn": "LOADED frame that was not due",
    "request that does not parse": "'prompts' is not a list",
    "output that is not UTF-8": "output that is not UTF-8",
}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_garbage_on_the_frame_pipe_gets_the_worker_killed_and_reported(
    backend: str,
) -> None:
    async with acquired(backend, exec_timeout_seconds=20) as box:
        await box.client.load_value("context_0", "the context", alias="context")
        for name, garbage in GARBAGE.items():
            await run_block(box, "kept = 1")
            code = FIND_FRAME_FD + garbage + "\nimport time\ntime.sleep(30)\nprint('survived')"
            report = await run_block(box, code)
            assert report.status == "worker_died", (name, report)
            assert "the sandbox broke its protocol: it " in report.error, (name, report)
            assert GARBAGE_REASONS[name] in report.error, (name, report.error)
            assert report.worker_restarted and "survived" not in report.stdout
            after = await run_block(box, "print('kept' in globals(), len(context))")
            assert after.status == "ok" and after.stdout == "False 11\n", (name, after)


REQUEST_FLOOD = (
    FIND_FRAME_FD
    + """
import json
for i in range(10_000):
    body = json.dumps({"id": 10**9 + i, "prompts": ["p"], "model": "", "kind": "llm_query"})
    os.write(FD, frame("q", body.encode()))
print("sent")
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_flood_of_raw_llm_requests_stays_within_the_bounds(backend: str) -> None:
    running = 0
    peak = 0
    started = 0
    release = asyncio.Event()

    async def held(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        nonlocal running, peak, started
        running += 1
        started += 1
        peak = max(peak, running)
        try:
            await release.wait()  # never answered: every request stays in flight
            return [SubCallOutcome(text="late")] * len(prompts)
        finally:
            running -= 1

    async with acquired(backend, exec_timeout_seconds=60) as box:
        await box.client.load_value("context_0", "the context", alias="context")
        report = await run_block(box, REQUEST_FLOOD, held)
        # Only the bounded number ever reached the orchestrator; the next ones were refused
        # at once, and a worker that kept going past the bound was killed.
        assert started == MAX_PENDING_REQUESTS and peak == MAX_PENDING_REQUESTS
        assert report.status == "worker_died" and "sent" not in report.stdout
        assert "the sandbox broke its protocol: it sent more than 256 sub-calls" in report.error
        assert running == 0  # cancelled with the execution: nothing left behind
        after = await run_block(box, "print(llm_query('q'), len(context))")
        assert after.stdout == "answer to q 11\n"


async def test_legitimate_floods_wait_for_room_instead_of_failing() -> None:
    # 10,000 prompts in one batch, and 1,000 threads at once: more than the bounds on what
    # is in flight. Legitimate code waits for room in the worker; every answer comes back.
    prompts_running = requests_running = 0
    peak_prompts = peak_requests = 0

    async def slow(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        nonlocal prompts_running, requests_running, peak_prompts, peak_requests
        prompts_running += len(prompts)
        requests_running += 1
        peak_prompts = max(peak_prompts, prompts_running)
        peak_requests = max(peak_requests, requests_running)
        try:
            await asyncio.sleep(0.01)
            return [SubCallOutcome(text=p.upper()) for p in prompts]
        finally:
            prompts_running -= len(prompts)
            requests_running -= 1

    code = """
import threading
answers = llm_query_batched([f"p{i}" for i in range(10_000)])
print(answers == [f"P{i}" for i in range(10_000)])
results = {}
def ask(i):
    results[i] = llm_query(f"t{i}")
threads = [threading.Thread(target=ask, args=(i,)) for i in range(1_000)]
for t in threads: t.start()
for t in threads: t.join()
print(all(results[i] == f"T{i}" for i in range(1_000)))
"""
    # 1,000 threads are more than a local sandbox allows by default (128 processes and threads;
    # 8 MiB of address space per thread stack against 2 GB per process): this code is granted
    # them, so that the sub-call bound is what it meets.
    granted = {"max_processes": 2048}
    async with acquired("local", granted, exec_timeout_seconds=60, memory_limit_mb=0) as box:
        report = await run_block(box, code, slow)
    assert report.status == "ok" and report.stdout == "True\nTrue\n", report
    assert peak_prompts <= MAX_PENDING_PROMPTS and peak_requests <= MAX_PENDING_REQUESTS


class HostileAgent(sandbox_pb2_grpc.SandboxServicer):  # type: ignore[misc]
    """A compromised agent (in Docker, user code shares the agent's uid): the orchestrator
    must bound what it takes from it too. A mock, as an honest agent cannot misbehave."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sent = 0

    async def Execute(self, request_iterator: Any, context: Any) -> None:
        await context.read()
        if self.mode == "flood":
            text = "A" * MB
            while self.sent < 1024 * MB:  # 1 GB attempted
                await context.write(
                    sandbox_pb.ExecuteResponse(output=sandbox_pb.OutputChunk(stream=1, text=text))
                )
                self.sent += len(text)
        elif self.mode == "requests":
            for i in range(10_000):
                request = sandbox_pb.LlmRequest(request_id=i, prompts=["p"], kind=1)
                await context.write(sandbox_pb.ExecuteResponse(llm_request=request))
        elif self.mode == "big result":
            result = sandbox_pb.ExecuteResult(
                status=1,
                error="E" * 4 * MB,
                variables=[
                    sandbox_pb.Variable(name=f"v{i}", type_name="int") for i in range(100_000)
                ],
            )
            await context.write(sandbox_pb.ExecuteResponse(result=result))
            return
        elif self.mode == "huge message":
            await context.write(
                sandbox_pb.ExecuteResponse(
                    output=sandbox_pb.OutputChunk(stream=1, text="B" * 32 * MB)
                )
            )
        await context.write(sandbox_pb.ExecuteResponse(result=sandbox_pb.ExecuteResult(status=1)))


@asynccontextmanager
async def hostile_agent(mode: str) -> AsyncIterator[tuple[AgentClient, HostileAgent]]:
    agent = HostileAgent(mode)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * MB)])
    sandbox_pb2_grpc.add_SandboxServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = AgentClient(f"127.0.0.1:{port}")
    try:
        yield client, agent
    finally:
        await client.close()
        await server.stop(None)


async def test_the_orchestrator_bounds_what_a_compromised_agent_sends() -> None:
    kept = 0

    async def count(stream: str, text: str) -> None:
        nonlocal kept
        kept += len(text)

    async def never(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    baseline = current_rss()
    with RSSSampler(os.getpid()) as rss:
        async with hostile_agent("flood") as (client, agent):
            with pytest.raises(SandboxError, match=r"broke its protocol.*past the cap"):
                await client.execute("x", on_output=count, on_sub_call=never)
            assert agent.sent < 16 * MB  # given up on early, not after 1 GB
    assert kept <= CAP + ORCHESTRATOR_OUTPUT_SLACK
    assert (rss.peak - baseline) / MB < 100

    calls = 0

    async def held(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async with hostile_agent("requests") as (client, _):
        with pytest.raises(SandboxError, match=r"broke its protocol.*in flight"):
            await client.execute("x", on_output=count, on_sub_call=held)
    assert calls == MAX_PENDING_REQUESTS

    async with hostile_agent("big result") as (client, _):
        report = await client.execute("x", on_output=count, on_sub_call=never)
    assert len(report.error) < 64 * 1024 and "characters cut" in report.error
    assert len(report.variables) == 1_000 and report.variables_omitted == 99_000

    async with hostile_agent("huge message") as (client, _):
        with pytest.raises(SandboxError, match="RESOURCE_EXHAUSTED"):
            await client.execute("x", on_output=count, on_sub_call=never)


# -- finding 1: output flood through `serve`: a client that does not read its stream -------------


async def test_a_client_that_never_reads_costs_the_server_a_bounded_buffer(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """10 turns of 10 blocks, each printing 1 M characters to stdout and to stderr (within the
    sandbox's caps): ~200 MB of events for a client that never reads. The server keeps its
    per-completion buffer (4 MiB) and drops output with markers; another client's completion
    runs meanwhile."""
    flood_block = repl(
        "import sys\nsys.stdout.write('x' * 1_000_000)\nsys.stderr.write('y' * 1_000_000)"
    )
    flood_turn = "\n".join([flood_block] * 10)

    def reply(request: RecordedRequest) -> str:
        if "FLOOD" not in str(request.messages):
            return ANSWER_IN_CODE
        turns = sum(1 for m in request.messages if m["role"] == "assistant")
        return flood_turn if turns < 10 else "FINAL(flooded)"

    lm.add_rule(Rule(reply, model="root"))
    server = orchestrator_server  # shared: only what this test adds is measured
    await still_answers(server, lm)  # warm: litellm imported, a sandbox started once
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        context = b"FLOOD"
        start = pb.CompletionStart(
            root_prompt="FLOOD",
            context_encoding=pb.CONTEXT_ENCODING_TEXT,
            context_bytes=len(context),
        )
        call = stub.Run(metadata=bearer_metadata(SERVER_TOKEN))
        await call.write(pb.RunRequest(start=start))
        assert (await call.read()).WhichOneof("kind") == "started"
        with RSSSampler(server.process.pid) as rss:
            await call.write(pb.RunRequest(context_chunk=context))
            await call.done_writing()
            # The flood runs; meanwhile another client's completion runs to its answer.
            await until(lambda: any("FLOOD" in str(r.messages) for r in lm.requests_for("root")))
            async with AsyncClient(server.address, token=SERVER_TOKEN) as victim:
                assert (await victim.completion("victim")).response == "VICTIM"
            # Until the flooding completion has answered (its client still reads nothing).
            await until(lambda: any(r.reply == "FINAL(flooded)" for r in lm.requests_for("root")))
            await asyncio.sleep(0.5)
        events = []
        while (message := await call.read()) is not grpc.aio.EOF:
            events.append(message)
    assert rss.growth_mb < 100, f"server RSS grew by {rss.growth_mb:.0f} MB"
    markers = [e.output for e in events if e.WhichOneof("kind") == "output"]
    dropped = sum(m.dropped_chars for m in markers)
    assert dropped > 100_000_000, f"only {dropped} characters were dropped"
    assert any("the server dropped" in m.text for m in markers if m.dropped_chars)
    blocks = [e.code_block_finished for e in events if e.HasField("code_block_finished")]
    flood_turns = sum(r.reply == flood_turn for r in lm.requests_for("root"))
    assert flood_turns >= 5 and len(blocks) == 10 * flood_turns
    assert all(b.cut_chars > 0 for b in blocks)
    assert all(len(b.stdout) < 70_000 for b in blocks)  # a bounded excerpt, head and tail
    assert events[-1].finished.response == "flooded"
    await still_answers(server, lm)


async def test_a_raw_frame_flood_through_serve_is_capped_and_other_clients_keep_running(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """The raw-frame flood (1 GB attempted on the agent's pipe) in a sandbox of `serve`: the
    server keeps at most the cap per stream, its RSS stays bounded, the attacker's completion
    goes on in a new worker, and another client's completion runs to its answer meanwhile."""
    for reply in (repl(FLOOD), repl("print('still here', 6 * 7)"), "FINAL(flooded)"):
        lm.add_rule(Rule(reply, model="root", contains="RAW FLOOD", times=1))
    received = {"stdout": 0, "stderr": 0}

    def count(event: ev.Event) -> None:
        if isinstance(event, ev.OutputChunk):
            received[event.stream] += len(event.text)

    server = orchestrator_server  # shared: only what this test adds is measured
    await still_answers(server, lm)  # warm: litellm imported, a sandbox started once
    async with (
        AsyncClient(server.address, token=SERVER_TOKEN) as attacker,
        AsyncClient(server.address, token=SERVER_TOKEN) as victim,
    ):
        with RSSSampler(server.process.pid) as rss:
            flood = asyncio.create_task(attacker.completion("ctx", "RAW FLOOD", on_event=count))
            await until(lambda: any(r.reply == repl(FLOOD) for r in lm.requests_for("root")))
            assert (await victim.completion("victim")).response == "VICTIM"
            assert (await flood).response == "flooded"
    assert rss.growth_mb < 100, f"server RSS grew by {rss.growth_mb:.0f} MB"
    for stream in ("stdout", "stderr"):
        assert 0 < received[stream] <= CAP + ORCHESTRATOR_OUTPUT_SLACK, received
    flooded = [r for r in lm.requests_for("root") if "RAW FLOOD" in str(r.messages)]
    shown = "\n".join(str(m["content"]) for m in flooded[-1].messages)
    assert "the sandbox broke its protocol" in shown
    assert "still here 42" in shown  # the next block ran, in a new worker
    await still_answers(server, lm)


# -- finding 8: big legitimate answers ----------------------------------------------------------

BIG = 20_000_000


@pytest.mark.parametrize("via", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "root",
    [
        [repl(f"x = 'ab' * {BIG // 2}"), "FINAL_VAR(x)"],
        [repl(f"x = 'ab' * {BIG // 2}\nFINAL_VAR('x')\nx = 'changed'")],
    ],
    ids=["after code", "inside code"],
)
def test_a_20_million_character_final_var_comes_back_whole(
    make_rlm: Callable[..., RLM], root: list[str], via: str
) -> None:
    result = make_rlm(root=root).completion("ctx")
    assert len(result.response) == BIG
    assert result.response == "ab" * (BIG // 2)


def test_a_final_var_over_the_limit_is_refused_and_the_model_told(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[
            repl("x = 'a' * 5000"),
            "FINAL_VAR(x)",
            repl("FINAL_VAR('x')"),
            repl("short = x[:10]\nFINAL_VAR('short')"),
        ],
        max_answer_chars=1000,
    )
    assert rlm.completion("ctx").response == "a" * 10
    told = root_messages(lm, 2)
    assert "FINAL_VAR(x) failed: x has 5000 characters, more than the limit of 1000" in told
    told = root_messages(lm, 3)
    assert "FINAL_VAR in your code failed: the answer has 5000 characters" in told


def test_out_of_turns_with_a_final_var_over_the_limit_fails_clearly(
    make_rlm: Callable[..., RLM],
) -> None:
    rlm = make_rlm(
        root=[repl("x = 'a' * 5000"), "FINAL_VAR(x)"], max_answer_chars=1000, max_iterations=1
    )
    with pytest.raises(AnswerTooLargeError, match="x has 5000 characters, more than the limit"):
        rlm.completion("ctx")


# -- finding 8: big answers come back whole through the server -----------------------------------


async def test_a_20_million_character_answer_streams_back_whole(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    answer = "".join(f"{i:08d}" for i in range(2_500_000))  # 20,000,000 characters
    lm.set_sequence("root", [f"FINAL({answer})", f"FINAL({answer}!)"])
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        result = await client.completion("ctx")
        assert result.response == answer
        # One character over the server's max_answer_chars: a clear error, never a cut.
        with pytest.raises(ResourceExhaustedError, match="max_answer_chars=20000000"):
            await client.completion("ctx")
    await still_answers(tenant_server, lm)


async def test_out_of_turns_a_final_var_over_the_servers_limit_is_answer_too_large(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    # The loop's AnswerTooLargeError used to reach the client as kind INTERNAL ("a bug on our
    # side", logged with a traceback) and a bare RLMError; it is the proto's ANSWER_TOO_LARGE.
    script = [repl("x = 'a' * 20_000_001"), "FINAL_VAR(x)"]
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        lm.set_sequence("root", script)
        events = [event async for event in client.stream("ctx", max_iterations=1)]
        failed = events[-1]
        assert isinstance(failed, ev.CompletionFailed), failed
        assert (failed.kind, failed.limit) == ("answer_too_large", 20_000_000)
        assert "AnswerTooLargeError: completion stopped: out of turns" in failed.message
        lm.set_sequence("root", script)
        with pytest.raises(ResourceExhaustedError, match="x has 20000001 characters"):
            await client.completion("ctx", max_iterations=1)
