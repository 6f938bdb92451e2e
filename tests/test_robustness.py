"""Hostile or broken code, seen from the RLM loop: the run goes on and the model is told."""

from __future__ import annotations

import ctypes
import gc
import re
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT_MODEL, repl

from rlm_orchestrator import RLM
from rlm_orchestrator import events as ev
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer


def root_messages(lm: ScriptedLMServer, turn: int) -> str:
    return "\n".join(str(m["content"]) for m in lm.requests_for(ROOT_MODEL)[turn].messages)


def test_infinite_loop_times_out_and_the_run_continues(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[repl("kept = 7"), repl("while True: pass"), repl("print(kept * 6)"), "FINAL(ok)"],
        environment_kwargs={"exec_timeout_seconds": 0.5},
    )
    assert rlm.completion("ctx").response == "ok"
    assert "TimeoutError: execution exceeded 0.5 seconds" in root_messages(lm, 2)
    assert "42" in root_messages(lm, 3)  # same namespace after the interrupt


def test_worker_suicide_is_reported_and_the_model_is_told_variables_are_lost(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[
            repl("kept = 1"),
            repl("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
            repl("print('kept' in globals(), len(context))"),
            "FINAL(done)",
        ]
    )
    assert rlm.completion("abc").response == "done"
    shown = root_messages(lm, 2)
    assert "killed by signal SIGKILL" in shown
    assert "all variables were lost" in shown
    assert "False 3" in root_messages(lm, 3)  # variables gone, context reloaded


def _memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in MB."""
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert found, f"no {field} in /proc/self/status"
    return int(found.group(1)) / 1024


def _resident_mb(lm: ScriptedLMServer) -> float:
    """What this process holds now: the LM server's records (in this process) are dropped,
    and memory freed but kept by malloc goes back to the system (else it looks like growth)."""
    lm.clear()
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc
        libc.malloc_trim(0)
    return _memory_mb("VmRSS")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def test_printing_200_mb_is_capped_and_memory_stays_bounded(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    """The orchestrator is this process: its peak stays far below the 200 MB printed, and
    blocks printing past the cap, over and over, leave nothing behind."""
    received = 0

    def count(event: ev.Event) -> None:
        nonlocal received
        if isinstance(event, ev.OutputChunk):
            received += len(event.text)

    import litellm  # noqa: F401  # its ~200 MB must not count as growth

    before = _resident_mb(lm)
    _reset_peak()
    rlm = make_rlm(
        root=[repl("for _ in range(200):\n    print('x' * 1_000_000)\nprint('END')"), "FINAL(ok)"],
        on_event=count,
    )
    assert rlm.completion("ctx").response == "ok"
    peak_growth = _memory_mb("VmHWM") - before
    shown = root_messages(lm, 1)
    assert "the sandbox also dropped" in shown
    assert "chars...]" in shown  # the 20,000-character cut of what the model sees
    assert received < 1_100_000  # the default cap: 1,000,000 characters per stream
    assert peak_growth < 150, f"the orchestrator's peak RSS grew by {peak_growth:.0f} MB"

    # Repeated: 30 blocks bring in 2 MB each (1 MB per stream, the cap), 60 MB in all; none
    # may stay (up to ~15 MB seem to: allocator slack). The worker (the blocks' own process)
    # measures itself the same way, from its first block to its last.
    capped = "print('y' * 3_000_000)\nprint('z' * 3_000_000, file=sys.stderr)"
    first = repl(f"{WORKER_RSS}\n{capped}\nfirst = rss()")
    last = repl("print(f'worker RSS grew by {rss() - first:.0f} MB')")
    before = _resident_mb(lm)
    rlm = make_rlm(root=[first, *[repl(capped)] * 29, last, "FINAL(ok)"], max_iterations=32)
    assert rlm.completion("ctx").response == "ok"
    worker = re.search(r"worker RSS grew by (-?\d+) MB", root_messages(lm, -1))
    growth = _resident_mb(lm) - before
    assert growth < 30, f"RSS grew by {growth:.0f} MB over 30 blocks of capped output"
    assert worker is not None, "the worker did not report its RSS"
    assert int(worker.group(1)) < 20, worker.group(0)


WORKER_RSS = """import ctypes, gc, re, sys
def rss():
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    status = open('/proc/self/status').read()
    return int(re.search(r'VmRSS:\\s+(\\d+) kB', status).group(1)) / 1024"""


def test_output_streams_to_events_before_the_block_ends(make_rlm: Callable[..., RLM]) -> None:
    seen: list[str] = []

    def record(event: ev.Event) -> None:
        if isinstance(event, ev.OutputChunk):
            seen.append(f"chunk:{event.text.strip()}")
        elif isinstance(event, ev.CodeBlockFinished):
            seen.append("block finished")

    code = "import time\nprint('first')\ntime.sleep(1)\nprint('second')"
    rlm = make_rlm(root=[repl(code), "FINAL(ok)"], on_event=record)
    rlm.completion("ctx")
    assert seen == ["chunk:first", "chunk:second", "block finished"]


def test_fork_bomb_is_stopped_by_the_timeout(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    # Children fork in a loop; the kill of the worker's process group takes them all.
    bomb = "import os, time\nfor _ in range(30):\n    if os.fork() == 0:\n        time.sleep(60)\n"
    bomb += "while True: time.sleep(0.01)"
    rlm = make_rlm(
        root=[
            repl("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + bomb),
            "FINAL(ok)",
        ],
        environment_kwargs={"exec_timeout_seconds": 0.5},
    )
    assert rlm.completion("ctx").response == "ok"
    assert "process group was killed" in root_messages(lm, 1)


def test_memory_limit_turns_a_huge_allocation_into_an_error(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[repl("kept = 1\nblob = bytearray(10 * 1024**3)"), repl("print(kept)"), "FINAL(ok)"],
        environment_kwargs={"memory_limit_mb": 512},
    )
    assert rlm.completion("ctx").response == "ok"
    assert "MemoryError" in root_messages(lm, 1)
    assert "1" in root_messages(lm, 2)  # the worker survived the refused allocation


def test_the_leak_check_sees_a_stray_agent() -> None:
    # The autouse leak check is only worth something if it notices a sandbox left running.
    import asyncio

    from conftest import _agent_processes, _sandbox_dirs

    from rlm_orchestrator.sandbox import SandboxSpec
    from rlm_orchestrator.sandbox.local import LocalProvider

    async def check() -> None:
        provider = LocalProvider()
        before_processes, before_dirs = _agent_processes(), _sandbox_dirs()
        sandbox = await provider.acquire(SandboxSpec(session_id="stray"))
        try:
            # The provider's fork server, the agent, its worker template and its worker;
            # jailed, the worker is three: the process forked outside, the jail's init and the
            # worker itself.
            jailed = sandbox.provider_state.isolation == "namespaces"
            assert len(_agent_processes() - before_processes) == (6 if jailed else 4)
            assert len(_sandbox_dirs() - before_dirs) == 1
        finally:
            await provider.aclose()

    asyncio.run(check())
