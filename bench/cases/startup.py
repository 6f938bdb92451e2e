"""Process start-up: `import rlm_orchestrator`, and the sandbox agent's start to LISTENING."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Metric, timing
from rlm_orchestrator.sandbox.local import sandbox_environment
from rlm_orchestrator.testing.scripted_lm import Script, ScriptedLMServer

NAME = "startup"
DESCRIPTION = (
    "python -c 'import rlm_orchestrator'; agent start to LISTENING; "
    "`rlm-orchestrator run` start to its first request at the model, and to an argument error"
)
N = 10
# `run` costs seconds a start: fewer repetitions.
N_RUN = 5
CLI = [sys.executable, "-m", "rlm_orchestrator.cli"]


async def _python(code: str) -> float:
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await process.wait() == 0
    return time.perf_counter() - start


async def _agent() -> float:
    """`python -m sandbox_agent` as the local provider starts it, until it prints LISTENING."""
    root = Path(tempfile.mkdtemp(prefix="rlm-bench-agent-"))
    (root / "tmp").mkdir()
    try:
        start = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandbox_agent",
            "--listen",
            f"unix:{root / 'agent.sock'}",
            "--workdir",
            str(root / "work"),
            "--state-dir",
            str(root / "state"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=sandbox_environment(root),
            cwd=root,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            elapsed = time.perf_counter() - start
            assert line.startswith(b"LISTENING"), line
        finally:
            if process.returncode is None:
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                os.killpg(process.pid, 9)
                await process.wait()
        return elapsed
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _cli_run(server: ScriptedLMServer, context: Path) -> tuple[float, float]:
    """`rlm-orchestrator run` against the scripted LM (local sandbox): seconds from the
    process's start to the model's first request, and to its exit."""
    server.clear()
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench-not-a-real-key"}
    args = ["run", "-c", str(context), "-q", "What is it?", "--model", "root"]
    args += ["--backend", "openai", "--api-base", server.base_url]
    start = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    ended = time.monotonic()
    assert process.returncode == 0 and out.strip() == b"bench answer", (out, err[-2000:])
    return server.requests[0].received_at - start, ended - start


async def _cli_error() -> float:
    """`rlm-orchestrator run` with an invalid setting, until it exits (code 2)."""
    args = ["run", "-c", "-", "-q", "q", "--max-iterations", "0"]
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await process.wait() == 2
    return time.perf_counter() - start


async def _cli() -> tuple[list[float], list[float], list[float]]:
    root = Path(tempfile.mkdtemp(prefix="rlm-bench-cli-"))
    context = root / "context.txt"
    context.write_text("alpha beta gamma\n" * 1000)
    first, total = [], []
    try:
        with ScriptedLMServer(Script(default="FINAL(bench answer)")) as server:
            await _cli_run(server, context)  # warm the page cache
            for _ in range(N_RUN):
                to_request, to_exit = await _cli_run(server, context)
                first.append(to_request)
                total.append(to_exit)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    errors = [await _cli_error() for _ in range(N_RUN)]
    return first, total, errors


async def run() -> list[Metric]:
    await _python("import rlm_orchestrator")  # warm the page cache
    await _agent()
    bare = [await _python("pass") for _ in range(N)]
    imports = [await _python("import rlm_orchestrator") for _ in range(N)]
    agent = [await _agent() for _ in range(N)]
    first, total, errors = await _cli()
    return [
        timing(NAME, "python -c pass (reference)", bare, "ms"),
        timing(NAME, "python -c 'import rlm_orchestrator'", imports, "ms"),
        timing(NAME, "agent start to LISTENING", agent, "ms", "<", 1000.0),
        timing(NAME, "run: start to first request at the model", first, "ms", "<", 1500.0),
        timing(NAME, "run: start to exit (one-step answer)", total, "ms"),
        timing(NAME, "run: argument error exit", errors, "ms"),
    ]
