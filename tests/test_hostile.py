"""Hostile sandboxes, hostile clients (issue 13): each test is the attack, then the proof that
nothing was lost (the victim's answer intact, the orchestrator alive and answering) and
nothing leaked (no process, container, socket or directory left: the autouse leak check)."""

from __future__ import annotations

import ast
import asyncio
import collections
import gc
import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import docker
import grpc
import psutil
import pytest
from conftest import (
    API_KEY,
    ROOT_MODEL,
    RUN_TMP,
    SANDBOX_IMAGE,
    SECRET_ENV,
    SERVER_TOKEN,
    SUB_MODEL,
    ServerProcess,
    _our_containers,
    backend_kwargs,
    repl,
    require_docker,
    server_config,
    start_server,
    stop_server,
)

from rlm_orchestrator import RLM, AnswerTooLargeError, SandboxError
from rlm_orchestrator import events as ev
from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.exceptions import (
    AuthenticationError,
    InvalidRequestError,
    ResourceExhaustedError,
    ServerShutdownError,
)
from rlm_orchestrator.sandbox import (
    Sandbox,
    SandboxProvider,
    SandboxSpec,
    SubCallOutcome,
    create_provider,
)
from rlm_orchestrator.sandbox.agent_client import AgentClient, ExecutionReport
from rlm_orchestrator.sandbox.docker import DockerOptions, DockerProvider
from rlm_orchestrator.service.security import bearer_metadata
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer
from sandbox_agent._proto.rlm.v1 import orchestrator_pb2 as pb
from sandbox_agent._proto.rlm.v1 import orchestrator_pb2_grpc, sandbox_pb2_grpc
from sandbox_agent._proto.rlm.v1 import sandbox_pb2 as sandbox_pb
from sandbox_agent.limits import (
    MAX_PENDING_PROMPTS,
    MAX_PENDING_REQUESTS,
    ORCHESTRATOR_OUTPUT_SLACK,
)

REPO = Path(__file__).resolve().parent.parent
ANSWER_IN_CODE = repl("answer = context.upper()\nFINAL_VAR('answer')")
MIB = 1024 * 1024


class RSSSampler:
    """The largest RSS growth of a process over a baseline, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 1e6


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # set by other threads (the scripted LM), not by an Event
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def still_answers(server: ServerProcess, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule(ANSWER_IN_CODE, model="root"))
    async with AsyncClient(server.address, token=SERVER_TOKEN) as client:
        assert (await client.completion("still serving")).response == "STILL SERVING"


@pytest.fixture(scope="module")
def tenant_server(
    lm_server: ScriptedLMServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server with small limits, shared by the tests of findings 4 and 8."""
    config = server_config(
        lm_server,
        tmp_path_factory.mktemp("tenants"),
        max_concurrent_completions=4,
        max_sessions=2,
        max_sandboxes=5,
        max_depth=2,
        default_max_depth=1,
        iteration_timeout_seconds=120.0,
        max_cost=5.0,
        max_answer_chars=20_000_000,
    )
    server = start_server(config)
    yield server
    stop_server(server)


async def _ignore_output(stream: str, text: str) -> None:
    return None


async def _no_sub_calls(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
    return [SubCallOutcome(error="none here")] * len(prompts)


class Gate:
    """Holds scripted LM replies until opened (the LM server answers from threads)."""

    def __init__(self) -> None:
        self.arrived = 0
        self._lock = threading.Lock()
        self._open = threading.Event()

    def hold(self, reply: str) -> Rule:
        def wait(request: RecordedRequest) -> str:
            with self._lock:
                self.arrived += 1
            self._open.wait(60)
            return reply

        return Rule(wait, model="root")

    def open(self) -> None:
        self._open.set()


def shown_to_model(lm: ScriptedLMServer) -> str:
    """Everything the root model was shown in its latest call (the REPL output included)."""
    return "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[-1].messages)


def processes_with(marker: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in " ".join(process.info["cmdline"] or []):
            found.append(process.pid)
    return found


def wait_until_gone(marker: str, seconds: float = 5.0) -> list[int]:
    """The processes still carrying `marker` after up to `seconds` (a bound, not a speed)."""
    deadline = time.monotonic() + seconds
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def _no_marker_left() -> Iterator[None]:
    yield
    assert processes_with("rlm-hostile-") == []


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


# -- finding 1: output flood through `serve`: a client that does not read its stream -------------


async def test_a_client_that_never_reads_costs_the_server_a_bounded_buffer(
    lm: ScriptedLMServer, tmp_path: Path
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
    server = start_server(server_config(lm, tmp_path))
    try:
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
                await until(
                    lambda: any("FLOOD" in str(r.messages) for r in lm.requests_for("root"))
                )
                async with AsyncClient(server.address, token=SERVER_TOKEN) as victim:
                    assert (await victim.completion("victim")).response == "VICTIM"
                # Until the flooding completion has answered (its client still reads nothing).
                await until(
                    lambda: any(r.reply == "FINAL(flooded)" for r in lm.requests_for("root"))
                )
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
    finally:
        stop_server(server)


# -- finding 2: local sandboxes isolate nothing ------------------------------------------------

# The attacker's code. It is told where everything is; each attempt prints what it got.
ATTACK = """
import json, os, socket
targets = {targets!r}
found = {{}}

def attempt(name, action):
    try:
        found[name] = "GOT " + repr(action())[:300]
    except Exception as exc:
        found[name] = "refused: " + type(exc).__name__

def read(path):
    with open(path, "rb") as source:
        return source.read()

def memory(pid):
    # What a same-user process can do: the orchestrator's heap, searched for keys.
    hits = []
    with open(f"/proc/{{pid}}/mem", "rb") as mem:
        for line in read(f"/proc/{{pid}}/maps").decode().splitlines():
            span, perms = line.split()[:2]
            if "r" in perms and ("[heap]" in line or len(line.split()) < 6):
                start, end = (int(x, 16) for x in span.split("-"))
                try:
                    mem.seek(start)
                    chunk = mem.read(min(end - start, 64 << 20))
                except OSError:
                    continue
                at = chunk.find(b"sk-")
                while at >= 0 and len(hits) < 50:
                    hits.append(chunk[at:at + 40])
                    at = chunk.find(b"sk-", at + 1)
    return hits

def unix(path):
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(2)
        connection.connect(path)
        return "connected"

def tcp(host, port):
    with socket.create_connection((host, port), timeout=2):
        return "connected"

def foreign_processes():
    mine = {{os.getpid(), os.getppid()}}
    others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in mine]
    others = [p for p in others if read(f"/proc/{{p}}/cmdline").find(b"sandbox_agent.worker") < 0]
    if not others:
        raise LookupError("no other process in sight")
    return others

for index, path in enumerate(targets["files"]):
    attempt(f"file {{index}}", lambda path=path: read(path))
attempt("list the victim's dir", lambda: os.listdir(targets["root"]))
for pid in targets["pids"]:
    attempt(f"environ of {{pid}}", lambda pid=pid: read(f"/proc/{{pid}}/environ"))
    attempt(f"memory of {{pid}}", lambda pid=pid: memory(pid))
    attempt(f"signal {{pid}}", lambda pid=pid: os.kill(pid, 0))
attempt("victim's agent socket", lambda: unix(targets["socket"]))
attempt("docker socket", lambda: unix("/var/run/docker.sock"))
attempt("scripted LM", lambda: tcp("127.0.0.1", targets["lm_port"]))
attempt("public address", lambda: tcp("1.1.1.1", 443))
attempt("other processes", foreign_processes)
print("ATTACK", json.dumps(found, sort_keys=True))
"""


def attack_code(root: Path, pids: list[int], lm: ScriptedLMServer, extra_files: list[Path]) -> str:
    files = [str(p) for p in sorted(root.rglob("*")) if p.is_file()] + [str(p) for p in extra_files]
    targets = {
        "root": str(root),
        "files": files,
        "pids": pids,
        "socket": str(root / "agent.sock"),
        "lm_port": int(lm.base_url.rsplit(":", 1)[1].split("/")[0]),
    }
    return ATTACK.format(targets=targets)


def assert_everything_refused(shown: str, secrets: list[str]) -> None:
    assert "ATTACK {" in shown, shown[-3000:]
    report = shown.split("ATTACK ", 1)[1].split("\n", 1)[0]
    for secret in secrets:
        assert secret not in shown, f"the attacker got {secret!r}"
    assert '"GOT' not in report, report


def sandbox_pids(agent_pid: int) -> list[int]:
    """The agent and every process under it (the victim's worker, its jail's init...)."""
    agent = psutil.Process(agent_pid)
    return [agent_pid, *(child.pid for child in agent.children(recursive=True))]


def test_a_session_cannot_reach_another_session_or_the_orchestrator(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    marker = uuid.uuid4().hex
    victim_context, victim_value = f"context-secret-{marker}", f"variable-secret-{marker}"
    victim = make_rlm(persistent=True, root=[repl(f"kept = {victim_value!r}"), "FINAL(first)"])
    try:
        assert victim.completion(victim_context).response == "first"
        assert victim._session is not None
        state = victim._session.sandbox.provider_state
        assert state.isolation == "namespaces"
        pids = [os.getpid(), *sandbox_pids(state.process.pid)]
        code = attack_code(state.root, pids, lm, extra_files=[])

        attacker = make_rlm(root=[repl(code), "FINAL(done)"])
        assert attacker.completion("attacker's context").response == "done"
        secrets = [victim_context, victim_value, state.token, API_KEY, *SECRET_ENV.values()]
        assert_everything_refused(shown_to_model(lm), secrets)

        # Without its token, even the orchestrator's own user cannot call the victim's agent.
        assert (state.root.stat().st_mode & 0o777) == 0o700
        assert ((state.root / "agent.sock").stat().st_mode & 0o777) == 0o600
        assert _unauthenticated(state.root / "agent.sock")

        lm.set_sequence(ROOT_MODEL, [repl("print(context_0[:15])"), "FINAL_VAR(kept)"])
        assert victim.completion("second").response == victim_value
        assert "context-secret-" in shown_to_model(lm)
    finally:
        victim.close()


def _unauthenticated(socket_path: Path) -> bool:
    import asyncio

    import grpc

    from sandbox_agent._proto.rlm.v1 import sandbox_pb2, sandbox_pb2_grpc

    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = sandbox_pb2_grpc.SandboxStub(channel)
            try:
                await stub.GetVariable(sandbox_pb2.GetVariableRequest(name="kept"), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    return asyncio.run(call()) == grpc.StatusCode.UNAUTHENTICATED


def test_through_serve_a_tenant_cannot_reach_another_or_the_servers_secrets(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    marker = uuid.uuid4().hex
    victim_context, victim_value = f"context-secret-{marker}", f"variable-secret-{marker}"
    before = set(RUN_TMP.glob("rlm-sbx-*"))
    with orchestrator_server.client() as client, client.create_session() as session:
        lm.set_sequence(ROOT_MODEL, [repl(f"kept = {victim_value!r}"), "FINAL(first)"])
        assert session.completion(victim_context, "remember").response == "first"
        [victim_root] = set(RUN_TMP.glob("rlm-sbx-*")) - before
        agents = [p for p in psutil.Process(orchestrator_server.process.pid).children()]
        pids = [orchestrator_server.process.pid]
        for agent in agents:
            pids += sandbox_pids(agent.pid)
        code = attack_code(victim_root, pids, lm, extra_files=[orchestrator_server.config])

        lm.set_sequence(ROOT_MODEL, [repl(code), "FINAL(done)"])
        assert client.completion("attacker's context", "attack").response == "done"
        secrets = [victim_context, victim_value, SERVER_TOKEN, *SECRET_ENV.values()]
        assert_everything_refused(shown_to_model(lm), secrets)

        lm.set_sequence(ROOT_MODEL, ["FINAL_VAR(kept)"])
        assert session.completion("again", "answer").response == victim_value


# -- finding 3: a forked child outlives its sandbox --------------------------------------------


def detached_child(marker: str) -> str:
    """Code that starts a process in a session of its own (out of the worker's group)."""
    return (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
        f"{marker!r}], start_new_session=True)\n"
        "print('spawned')"
    )


ALIVE = "import os\nos.kill(child.pid, 0)\nprint('child alive')"


@pytest.mark.parametrize("via", ["local", "docker"], indirect=True)
def test_a_setsid_child_does_not_outlive_its_sandbox(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer, via: str
) -> None:
    marker = f"rlm-hostile-{uuid.uuid4().hex}"
    rlm = make_rlm(root=[repl(detached_child(marker)), repl(ALIVE), "FINAL(ok)"])
    assert rlm.completion("ctx").response == "ok"
    assert "child alive" in shown_to_model(lm)
    assert wait_until_gone(marker) == []  # released: the sandbox took it with it


@pytest.mark.parametrize("via", ["local", "docker"], indirect=True)
def test_a_setsid_child_does_not_survive_an_exec_timeout(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer, via: str
) -> None:
    marker = f"rlm-hostile-{uuid.uuid4().hex}"
    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    rlm = make_rlm(
        persistent=True,
        root=[repl(f"{detached_child(marker)}\n{stubborn}"), repl("print('after')"), "FINAL(ok)"],
        environment_kwargs={"exec_timeout_seconds": 1.0},
    )
    try:
        assert rlm.completion("ctx").response == "ok"
        assert "TimeoutError" in "\n".join(
            str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[1].messages
        )
        assert wait_until_gone(marker) == []  # the sandbox lives on; the child does not
        lm.set_sequence(ROOT_MODEL, [repl("print(len(context_0))"), "FINAL(still)"])
        assert rlm.completion("ctx2").response == "still"
    finally:
        rlm.close()


def test_a_fork_bomb_is_capped_by_the_default_process_limit(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    # The children are forks of the worker: the leak check finds any that outlive the test.
    bomb = (
        "import os, time\nforked = 0\ntry:\n    for _ in range(1024):\n"
        "        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n"
        "        forked += 1\n"
        "except OSError as exc:\n    print('refused after', forked, type(exc).__name__, exc)"
    )
    rlm = make_rlm(root=[repl(bomb), repl("print('next block runs')"), "FINAL(ok)"])
    assert rlm.completion("ctx").response == "ok"
    shown = "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[1].messages)
    assert "refused after" in shown and "Resource temporarily unavailable" in shown
    forked = int(shown.split("refused after ", 1)[1].split()[0])
    assert forked < 128
    assert "next block runs" in shown_to_model(lm)


def test_ten_gigabytes_fail_under_the_default_memory_limit(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[
            repl("kept = 7\nblob = bytearray(10 * 1024**3)"),
            repl("print(kept * 6)"),
            "FINAL(ok)",
        ]
    )
    assert rlm.completion("ctx").response == "ok"
    shown = "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[1].messages)
    assert "MemoryError" in shown
    assert "42" in shown_to_model(lm)


# -- finding 4: server limits hold against one token holder --------------------------------------


async def test_ten_concurrent_runs_are_admitted_up_to_the_limit_before_any_upload(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    gate = Gate()
    lm.add_rule(gate.hold(ANSWER_IN_CODE))
    context = "held open " * 100_000  # 1 MB: the refused ones must not have sent it
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        outcomes: list[str] = []
        accepted = asyncio.Event()

        async def one(i: int) -> str:
            try:
                async for event in client.stream(f"{context}{i}"):
                    if isinstance(event, ev.CompletionStarted):
                        outcomes.append("started")
                        if outcomes.count("started") == 4:
                            accepted.set()
                    if isinstance(event, ev.CompletionFinished):
                        return event.result.response
            except ResourceExhaustedError as exc:
                outcomes.append(str(exc))
                return "refused"
            return "no answer"

        tasks = [asyncio.create_task(one(i)) for i in range(10)]
        await asyncio.wait_for(accepted.wait(), 60)
        await until(lambda: len(outcomes) == 10)  # every call answered: 4 accepted, 6 refused
        running = await client.list_completions()
        # A further Run while the four hold their slots (their LM calls wait at the gate).
        with pytest.raises(ResourceExhaustedError, match="max_concurrent_completions=4"):
            await client.completion("one too many")
        gate.open()
        answers = await asyncio.gather(*tasks)
    assert outcomes.count("started") == 4
    refusals = [o for o in outcomes if o != "started"]
    assert len(refusals) == 6
    assert all("max_concurrent_completions=4" in r for r in refusals), refusals
    assert len(running) <= 4
    assert answers.count("refused") == 6
    assert sum(a.startswith("HELD OPEN") for a in answers) == 4
    # The refused ones were refused before their upload: only 4 contexts reached the LM.
    assert gate.arrived == 4
    await still_answers(tenant_server, lm)


async def test_sessions_are_capped_and_count_as_sandboxes(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """max_sessions=2, max_sandboxes=5: two sessions and three held completions take every
    sandbox, so a fourth completion is refused although max_concurrent_completions=4."""
    gate = Gate()
    lm.add_rule(gate.hold(ANSWER_IN_CODE))
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        first, second = await client.create_session(), await client.create_session()
        try:
            with pytest.raises(ResourceExhaustedError, match="max_sessions=2"):
                await client.create_session()
            held = [asyncio.create_task(client.completion(f"held {i}")) for i in range(3)]
            await until(lambda: gate.arrived == 3)
            with pytest.raises(ResourceExhaustedError, match="max_sandboxes=5"):
                await client.completion("a sixth sandbox")
            gate.open()
            assert sorted(r.response for r in await asyncio.gather(*held)) == [
                "HELD 0",
                "HELD 1",
                "HELD 2",
            ]
        finally:
            await first.close()
        third = await client.create_session()  # the slot came back
        await second.close()
        await third.close()
    await still_answers(tenant_server, lm)


async def test_options_above_the_server_ceilings_are_refused(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    over = {
        "max_depth": 3,
        "max_iterations": 31,
        "exec_timeout_seconds": 301.0,
        "timeout_seconds": 3601.0,
        "iteration_timeout_seconds": 121.0,
        "max_cost": 5.5,
    }
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        for name, value in over.items():
            with pytest.raises(InvalidRequestError, match=f"above the server's ceiling {name}="):
                await client.completion("ctx", **{name: value})
            with pytest.raises(InvalidRequestError, match=f"ceiling {name}="):
                await client.create_session(**{name: value})
        for bad in (float("nan"), float("inf"), -1.0, 0.0):
            with pytest.raises(InvalidRequestError, match="must be a positive number"):
                await client.completion("ctx", timeout_seconds=bad)
        # Lower than the ceilings is the client's right.
        lm.add_rule(Rule(ANSWER_IN_CODE, model="root"))
        result = await client.completion("lower", max_iterations=2, exec_timeout_seconds=5.0)
        assert result.response == "LOWER"
    await still_answers(tenant_server, lm)


async def test_rlm_query_children_count_against_max_sandboxes_and_fail_as_sub_calls(
    tenant_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """max_sandboxes=5: the parent holds one, four children get one each, the fifth child is
    refused; the model sees that as a sub-call error and the completion goes on."""
    arrived = threading.Semaphore(0)
    all_four = threading.Barrier(4, timeout=60)  # the four children live at once

    def child(request: RecordedRequest) -> str:
        arrived.release()
        all_four.wait()
        return "FINAL(child ok)"

    lm.add_rule(Rule(child, model=SUB_MODEL))
    lm.set_sequence(
        "root",
        [repl("answers = rlm_query_batched([f'q{i}' for i in range(5)])"), "FINAL_VAR(answers)"],
    )
    async with AsyncClient(tenant_server.address, token=SERVER_TOKEN) as client:
        result = await client.completion("ctx", max_depth=2)
    answers = ast.literal_eval(result.response)
    assert answers.count("child ok") == 4
    [refused] = [a for a in answers if a != "child ok"]
    assert refused.startswith("Error:") and "max_sandboxes=5" in refused
    await still_answers(tenant_server, lm)


# -- finding 5: unauthenticated callers get nothing for free -------------------------------------


def test_anonymous_16_mib_messages_cost_the_server_nothing_and_are_unauthenticated(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """40 anonymous calls (streams and unary), each sending a 16 MiB message, at once. The
    sync gRPC client reports the status the server sent (grpc.aio's may mask it when its own
    write races the refusal: see sandbox_agent/auth.py)."""
    payload = b"\x0a" + b"\xff" * (16 * MIB - 64)
    codes: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(orchestrator_server.address) as channel:
        run = channel.stream_stream("/rlm.v1.Orchestrator/Run")
        cancel = channel.unary_unary("/rlm.v1.Orchestrator/CancelCompletion")
        complete = channel.unary_unary("/rlm.v1.LMRouter/Complete")

        def attack(i: int) -> None:
            try:
                if i % 3 == 0:
                    list(run(iter([payload]), timeout=60))
                elif i % 3 == 1:
                    cancel(payload, timeout=60)
                else:
                    complete(payload, metadata=bearer_metadata("wrong"), timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1

        with RSSSampler(orchestrator_server.process.pid) as rss, ThreadPoolExecutor(40) as pool:
            list(pool.map(attack, range(40)))
    assert codes == {"UNAUTHENTICATED": 40}
    assert rss.growth_mb < 32, f"server RSS grew by {rss.growth_mb:.0f} MB"
    asyncio.run(still_answers(orchestrator_server, lm))


async def test_the_sdk_always_sees_unauthenticated_even_when_racing(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    """Without waiting for the server's headers, ~1 in 3 rounds had a call reporting INTERNAL."""
    results: list[object] = []
    async with AsyncClient(orchestrator_server.address, token="wrong") as client:
        for _ in range(4):
            results += await asyncio.gather(
                *(client.completion("x" * 100_000) for _ in range(50)), return_exceptions=True
            )
    assert all(isinstance(r, AuthenticationError) for r in results), {
        type(r).__name__ for r in results
    }
    await still_answers(orchestrator_server, lm)


async def run_code(box: Sandbox, code: str) -> ExecutionReport:
    async def ignore(stream: str, text: str) -> None:
        return None

    async def answer(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        return [SubCallOutcome(text="answer") for _ in prompts]

    return await box.client.execute(code, on_output=ignore, on_sub_call=answer)


# -- finding 6: the Docker socket directory and orphaned containers ---------------------------

# Sandbox code that tries to use the bind-mounted socket directory: to fill the host's disk
# outside the container's tmpfs cap, and to remove its own agent's socket.
SOCKET_DIR_ATTACK = textwrap.dedent("""
    import json, os
    tried = {}
    try:
        with open('/sock/flood', 'wb') as f:
            for _ in range(64):
                f.write(b'x' * (1 << 20))
        tried['write'] = 'written'
    except OSError as exc:
        tried['write'] = type(exc).__name__
    try:
        os.unlink('/sock/agent.sock')
        tried['unlink'] = 'removed'
    except OSError as exc:
        tried['unlink'] = type(exc).__name__
    print(json.dumps(tried))
""")

# The same attack driven by an orchestrator running as a non-root user (a member of the
# docker group), as a script: the test runs it with setpriv.
NON_ROOT_ORCHESTRATOR = textwrap.dedent("""
    import asyncio, json, os, sys
    from pathlib import Path
    from rlm_orchestrator.sandbox import SandboxSpec, SubCallOutcome
    from rlm_orchestrator.sandbox.docker import DockerOptions, DockerProvider

    async def ignore(stream, text):
        return None

    async def no_calls(prompts, model, kind):
        return [SubCallOutcome(error="none") for _ in prompts]

    async def main():
        provider = DockerProvider(DockerOptions(image=sys.argv[1]))
        box = await provider.acquire(SandboxSpec(session_id="non-root"))
        try:
            sock_dir = box.provider_state.root / "sock"
            attack = await box.client.execute(
                sys.argv[2], on_output=ignore, on_sub_call=no_calls
            )
            after = await box.client.execute(
                "print(6 * 7)", on_output=ignore, on_sub_call=no_calls
            )
            stat = sock_dir.stat()
            print(json.dumps({
                "uid": os.geteuid(),
                "attack": attack.stdout,
                "after": after.stdout,
                "dir_mode": oct(stat.st_mode & 0o777),
                "dir_owner": stat.st_uid,
                "dir_files": sorted(p.name for p in sock_dir.iterdir()),
            }))
        finally:
            await provider.release(box)
            await provider.aclose()

    asyncio.run(main())
""")
NON_ROOT_UID = 4242


def _check_socket_dir_attack(attack_stdout: str, after_stdout: str) -> None:
    tried = json.loads(attack_stdout.strip().splitlines()[-1])
    assert tried == {"write": "PermissionError", "unlink": "PermissionError"}
    assert after_stdout.strip() == "42"  # the agent's socket is intact: it still answers


@pytest.mark.docker
async def test_docker_socket_dir_is_locked_after_the_agent_binds() -> None:
    require_docker()
    provider = DockerProvider(DockerOptions(image=SANDBOX_IMAGE))
    try:
        box = await provider.acquire(SandboxSpec(session_id="socket-dir-attack"))
        try:
            sock_dir = box.provider_state.root / "sock"
            attack = await run_code(box, SOCKET_DIR_ATTACK)
            after = await run_code(box, "print(6 * 7)")
            _check_socket_dir_attack(attack.stdout, after.stdout)
            assert sorted(p.name for p in sock_dir.iterdir()) == ["agent.sock"]
            assert sock_dir.stat().st_uid == os.geteuid()
            assert sock_dir.stat().st_mode & 0o777 == 0o755
        finally:
            await provider.release(box)
    finally:
        await provider.aclose()


def _non_root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start an orchestrator as another user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    # Our interpreter may live under /root (0700): run the venv's packages with the system's
    # CPython of the same minor version instead.
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        return f"{system_python} is missing"
    try:
        grp.getgrnam("docker")
    except KeyError:
        return "no docker group to give the non-root orchestrator access to the engine"
    return None


@pytest.mark.docker
def test_docker_socket_dir_is_locked_for_a_non_root_orchestrator() -> None:
    require_docker()
    problem = _non_root_problem()
    if problem is not None:
        pytest.skip(problem)
    home = Path(tempfile.mkdtemp(prefix="non-root-orchestrator-", dir="/tmp"))
    os.chown(home, NON_ROOT_UID, NON_ROOT_UID)
    site_packages = sysconfig.get_paths()["purelib"]
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONPATH": f"{REPO}:{site_packages}",
        "RLM_SANDBOX_OWNER": os.environ["RLM_SANDBOX_OWNER"],
    }
    command = [
        "setpriv",
        f"--reuid={NON_ROOT_UID}",
        f"--regid={NON_ROOT_UID}",
        f"--groups={grp.getgrnam('docker').gr_gid}",
        f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",
        "-c",
        NON_ROOT_ORCHESTRATOR,
        SANDBOX_IMAGE,
        SOCKET_DIR_ATTACK,
    ]
    try:
        done = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen["uid"] == NON_ROOT_UID
        _check_socket_dir_attack(seen["attack"], seen["after"])
        assert seen["dir_files"] == ["agent.sock"]
        assert (seen["dir_owner"], seen["dir_mode"]) == (NON_ROOT_UID, "0o755")
        assert list(home.iterdir()) == []  # its sandbox dir went with the release
    finally:
        shutil.rmtree(home, ignore_errors=True)


ORPHANED_ORCHESTRATOR = textwrap.dedent("""
    import asyncio, sys
    from rlm_orchestrator.sandbox import SandboxSpec
    from rlm_orchestrator.sandbox.docker import DockerOptions, DockerProvider

    async def main():
        options = DockerOptions(image=sys.argv[1], orphan_timeout_seconds=float(sys.argv[2]))
        box = await DockerProvider(options).acquire(SandboxSpec(session_id="orphan"))
        print(box.provider_state.container.id, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


@pytest.mark.docker
def test_an_orphaned_docker_sandbox_stops_by_itself() -> None:
    require_docker()
    before = _our_containers()
    owner = subprocess.Popen(
        [sys.executable, "-c", ORPHANED_ORCHESTRATOR, SANDBOX_IMAGE, "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    client = docker.from_env()
    try:
        assert owner.stdout is not None
        container_id = owner.stdout.readline().strip()
        assert container_id, "the orchestrator did not start a sandbox"
        container = client.containers.get(container_id)
        assert container.status == "running"
        owner.send_signal(signal.SIGKILL)  # no clean-up of any kind runs
        owner.wait()
        # Its agent notices the Attach stream is gone and stops: the container exits (the
        # deadline is only a bound for a broken build, not the behaviour under test).
        deadline = time.monotonic() + 60
        while container.status == "running" and time.monotonic() < deadline:
            time.sleep(0.25)
            container.reload()
        assert container.status == "exited", "the orphaned sandbox is still running"
        logs = container.logs().decode(errors="replace")
        assert "orphaned sandbox" in logs
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout:
            owner.stdout.close()
        client.close()
    # What is left (a stopped container, its socket dir) goes with the next reconcile.
    assert asyncio.run(DockerProvider(DockerOptions(image=SANDBOX_IMAGE)).reconcile()) >= 1
    assert not (_our_containers() - before)


@pytest.mark.docker
def test_an_idle_persistent_session_keeps_its_docker_sandbox(lm: ScriptedLMServer) -> None:
    """The other side of the orphan timeout: an orchestrator that is alive but idle (no event
    loop running between two completions) must not lose its sandbox."""
    require_docker()
    lm.set_sequence("root", [repl("kept = 6 * 7"), "FINAL(set)", repl("print(kept)"), "FINAL(ok)"])
    rlm = RLM(
        backend="openai",
        backend_kwargs=backend_kwargs(lm, "root"),
        environment="docker",
        environment_kwargs={"image": SANDBOX_IMAGE, "orphan_timeout_seconds": 1},
        persistent=True,
    )
    with rlm:
        assert rlm.completion("ctx").response == "set"
        time.sleep(4)  # four orphan timeouts with nothing running in this process
        assert rlm.completion("ctx").response == "ok"
    shown = "\n".join(str(m["content"]) for m in lm.requests_for("root")[-1].messages)
    assert "42" in shown
    assert "restarted" not in shown and "new sandbox" not in shown


# -- finding 7: the local agent dies with the thread that started it ---------------------------


def test_a_persistent_rlm_first_used_from_a_thread_keeps_its_sandbox(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(persistent=True, root=[repl("kept = 42"), "FINAL(first)"])
    answers: list[str] = []
    try:
        thread = threading.Thread(target=lambda: answers.append(rlm.completion("c").response))
        thread.start()
        thread.join()
        assert answers == ["first"]
        assert rlm._session is not None
        sandbox = rlm._session.sandbox
        lm.set_sequence(ROOT_MODEL, ["FINAL_VAR(kept)"])
        assert rlm.completion("c2").response == "42"  # the variable is still there
        assert rlm._session.sandbox is sandbox  # the same sandbox, not a replacement
    finally:
        rlm.close()


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


# -- finding 9: malformed messages; shutdown --------------------------------------------------


async def test_garbage_bytes_get_invalid_argument_from_the_server(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    garbage = b"\xff\xfe\x00garbage"
    token = bearer_metadata(SERVER_TOKEN)
    async with grpc.aio.insecure_channel(orchestrator_server.address) as channel:
        for method in ("/rlm.v1.Orchestrator/CancelCompletion", "/rlm.v1.LMRouter/Complete"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(method)(garbage, metadata=token, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "does not decode" in (caught.value.details() or "")
        run = channel.stream_stream("/rlm.v1.Orchestrator/Run")(metadata=token, timeout=10)
        await run.write(garbage)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Without the token, nothing is decoded at all.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/rlm.v1.LMRouter/Complete")(garbage, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await still_answers(orchestrator_server, lm)


@pytest.mark.parametrize("environment", ["local", "docker"])
async def test_garbage_bytes_get_invalid_argument_from_a_sandbox_agent(environment: str) -> None:
    if environment == "docker":
        require_docker()
    options = {"image": SANDBOX_IMAGE} if environment == "docker" else {}
    provider = create_provider(environment, options)
    try:
        box = await provider.acquire(SandboxSpec(session_id="garbage", exec_timeout_seconds=5.0))
        channel, metadata = box.client._channel, box.client._metadata
        for method in ("/rlm.v1.Sandbox/GetVariable", "/rlm.v1.Sandbox/GetInfo"):
            call = channel.unary_unary(method)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"\xff\xfe\x00garbage", metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        execute = channel.stream_stream("/rlm.v1.Sandbox/Execute")(metadata=metadata, timeout=10)
        await execute.write(b"\xff\xfe\x00garbage")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await execute.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The agent still runs code.
        report = await box.client.execute(
            "print(6 * 7)", on_output=_ignore_output, on_sub_call=_no_sub_calls
        )
        assert report.stdout.strip() == "42"
    finally:
        await provider.aclose()


async def test_sigterm_reaches_clients_as_a_server_shutdown(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    server = start_server(server_config(lm, tmp_path, shutdown_grace_seconds=1.0))
    try:
        lm.add_rule(Rule(repl("import time\ntime.sleep(120)"), model="root"))
        async with AsyncClient(server.address, token=SERVER_TOKEN) as client:
            running = asyncio.Event()

            def on_event(event: ev.Event) -> None:
                if isinstance(event, ev.CodeBlockStarted):
                    running.set()

            sleeper = asyncio.create_task(client.completion("ctx", "q", on_event=on_event))
            # A second client accepted but still uploading when the shutdown comes.
            channel = grpc.aio.insecure_channel(server.address)
            uploading = await _accepted_but_uploading(channel)
            await asyncio.wait_for(running.wait(), 60)
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(ServerShutdownError) as caught:
                await sleeper
            # From the `failed` event (SERVER_SHUTDOWN), not a bare status: it names the grace.
            assert caught.value.grace_seconds == 1.0
            assert "1 s shutdown grace period" in str(caught.value)
            # New work is refused as a shutdown too (the server still listens: the uploading
            # stream below keeps it in its flush period).
            with pytest.raises(ServerShutdownError, match="UNAVAILABLE: the server is shutting"):
                await client.completion("too late")
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await uploading.read()
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (cut.value.details() or "")
            assert ("rlm-server-shutdown", "1") in tuple(cut.value.trailing_metadata() or ())
            await channel.close()
        assert server.process.wait(30) == 0  # then the leak check finds no sandbox
    finally:
        stop_server(server)


async def _accepted_but_uploading(channel: grpc.aio.Channel) -> Any:
    call = orchestrator_pb2_grpc.OrchestratorStub(channel).Run(
        metadata=bearer_metadata(SERVER_TOKEN)
    )
    start = pb.CompletionStart(context_encoding=pb.CONTEXT_ENCODING_TEXT, context_bytes=10)
    await call.write(pb.RunRequest(start=start))
    assert (await call.read()).WhichOneof("kind") == "started"
    await call.write(pb.RunRequest(context_chunk=b"12345"))  # 5 of the 10 bytes announced
    return call
