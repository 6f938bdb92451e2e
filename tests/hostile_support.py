"""What the hostile tests (tests/test_hostile*.py) share: attacks, samplers, servers."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    ROOT_MODEL,
    SANDBOX_IMAGE,
    SERVER_TOKEN,
    ServerProcess,
    repl,
    require_docker,
    server_config,
    start_server,
    stop_server,
)

from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.sandbox import (
    Sandbox,
    SandboxProvider,
    SandboxSpec,
    SubCallOutcome,
)
from rlm_orchestrator.sandbox.agent_client import ExecutionReport
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

REPO = Path(__file__).resolve().parent.parent
ANSWER_IN_CODE = repl("answer = context.upper()\nFINAL_VAR('answer')")


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


MB = 1024 * 1024
CAP = 1_000_000  # the default max_output_chars, per stream
BACKENDS = [pytest.param("local", id="local"), pytest.param("docker", id="docker")]


def root_messages(lm: ScriptedLMServer, turn: int) -> str:
    return "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[turn].messages)


def current_rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


@asynccontextmanager
async def acquired(
    backend: str, options: dict[str, Any] | None = None, **spec: Any
) -> AsyncIterator[Sandbox]:
    """A sandbox of `backend` (with these environment_kwargs), released (and its provider
    closed) at the end."""
    provider: SandboxProvider
    if backend == "docker":
        require_docker()
        from rlm_orchestrator.config import DockerConfig
        from rlm_orchestrator.sandbox.docker import DockerProvider

        provider = DockerProvider(DockerConfig(image=SANDBOX_IMAGE, **(options or {})))
    else:
        from rlm_orchestrator.config import LocalConfig
        from rlm_orchestrator.sandbox.local import LocalProvider

        provider = LocalProvider(LocalConfig(**(options or {})))
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


# Tenants of `tenant_server` besides the usual token ("default"): a has a share of one
# completion at a time.
TOKEN_A, TOKEN_B = "token-of-tenant-a", "token-of-tenant-b"


@pytest.fixture(scope="session")
def tenant_server(
    lm_server: ScriptedLMServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server with small limits and two more tenants, shared by the tests of findings 4, 8."""
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
        # A 20-million-character FINAL(...) is longer than any output limit: none is sent.
        max_tokens=0,
    )
    with config.open("a") as toml:
        toml.write(
            f'[[tenants]]\nname = "a"\ntoken = "{TOKEN_A}"\nmax_concurrent_completions = 1\n'
            f'[[tenants]]\nname = "b"\ntoken = "{TOKEN_B}"\n'
        )
    server = start_server(config)
    yield server
    stop_server(server)
