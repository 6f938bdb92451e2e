"""Hostile sandboxes: each test is an attack, and asserts that nothing was lost or leaked.

Issue 13. One section per finding. The sandboxed code is written by a model: it is hostile,
and every bound must hold in a process it cannot touch.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import psutil
import pytest
from conftest import ROOT_MODEL, SANDBOX_IMAGE, repl, require_docker

from rlm_orchestrator import RLM, AnswerTooLargeError, SandboxError
from rlm_orchestrator import events as ev
from rlm_orchestrator.sandbox import Sandbox, SandboxProvider, SandboxSpec, SubCallOutcome
from rlm_orchestrator.sandbox.agent_client import AgentClient, ExecutionReport
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from sandbox_agent._proto.rlm.v1 import sandbox_pb2 as sandbox_pb
from sandbox_agent._proto.rlm.v1 import sandbox_pb2_grpc
from sandbox_agent.limits import (
    MAX_PENDING_PROMPTS,
    MAX_PENDING_REQUESTS,
    ORCHESTRATOR_OUTPUT_SLACK,
)

MB = 1024 * 1024
CAP = 1_000_000  # the default max_output_chars, per stream
BACKENDS = [pytest.param("local", id="local"), pytest.param("docker", id="docker")]


def root_messages(lm: ScriptedLMServer, turn: int) -> str:
    return "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[turn].messages)


class RssSampler:
    """The largest current RSS of this process while the block runs (sampled in a thread)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def current_rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


@asynccontextmanager
async def acquired(backend: str, **spec: Any) -> AsyncIterator[Sandbox]:
    """A sandbox of `backend`, released (and its provider closed) at the end."""
    provider: SandboxProvider
    if backend == "docker":
        require_docker()
        from rlm_orchestrator.sandbox.docker import DockerOptions, DockerProvider

        provider = DockerProvider(DockerOptions(image=SANDBOX_IMAGE))
    else:
        from rlm_orchestrator.sandbox.local import LocalProvider

        provider = LocalProvider()
    try:
        box = await provider.acquire(SandboxSpec(session_id="hostile", **spec))
        try:
            yield box
        finally:
            await provider.release(box)
    finally:
        await provider.aclose()


async def run_block(
    box: Sandbox,
    code: str,
    on_sub_call: Callable[[list[str], str, str], Any] | None = None,
) -> ExecutionReport:
    async def ignore(stream: str, text: str) -> None:
        return None

    async def answer(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        return [SubCallOutcome(text=f"answer to {p}") for p in prompts]

    return await box.client.execute(code, on_output=ignore, on_sub_call=on_sub_call or answer)


# What an attacker does first: find the worker -> agent frame pipe. Its number is in argv;
# without that, it is the only write-only pipe besides fds 1 and 2.
FIND_FRAME_FD = """
import fcntl, os, struct, sys
def frame_fd():
    if "--frame-fd" in sys.argv:
        return int(sys.argv[sys.argv.index("--frame-fd") + 1])
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue
        if fd > 2 and target.startswith("pipe:") and flags & os.O_ACCMODE == os.O_WRONLY:
            return fd
    raise RuntimeError("no frame pipe found")
FD = frame_fd()
def frame(kind, payload):
    return struct.pack(">IB", len(payload), ord(kind)) + payload
"""

# 1 GB attempted, in frames of the size a legitimate worker sends (1 MiB, within the limit
# of an output frame): the cap must be counted by the agent, not by the frame size.
FLOOD = (
    FIND_FRAME_FD
    + """
payload = b"A" * (1 << 20)
data = frame("o", payload) + frame("e", payload)
written = 0
try:
    while written < (1 << 30):
        os.write(FD, data)
        written += len(data)
except OSError:
    pass
print("flood", "over:", written)
"""
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
    with RssSampler().running() as rss:
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
    async with acquired("local", exec_timeout_seconds=60) as box:
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
    with RssSampler().running() as rss:
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
