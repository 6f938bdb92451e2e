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

NAME = "startup"
DESCRIPTION = "python -c 'import rlm_orchestrator'; agent start to LISTENING"
N = 10


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


async def run() -> list[Metric]:
    await _python("import rlm_orchestrator")  # warm the page cache
    await _agent()
    bare = [await _python("pass") for _ in range(N)]
    imports = [await _python("import rlm_orchestrator") for _ in range(N)]
    agent = [await _agent() for _ in range(N)]
    return [
        timing(NAME, "python -c pass (reference)", bare, "ms"),
        timing(NAME, "python -c 'import rlm_orchestrator'", imports, "ms"),
        timing(NAME, "agent start to LISTENING", agent, "ms", "<", 1000.0),
    ]
