"""Hostile or broken code, seen from the RLM loop: the run goes on and the model is told."""

from __future__ import annotations

import resource
from collections.abc import Callable

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


def test_printing_200_mb_is_capped_and_memory_stays_bounded(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    received = 0

    def count(event: ev.Event) -> None:
        nonlocal received
        if isinstance(event, ev.OutputChunk):
            received += len(event.text)

    import litellm  # noqa: F401  # its ~200 MB must not count as growth

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rlm = make_rlm(
        root=[repl("for _ in range(200):\n    print('x' * 1_000_000)\nprint('END')"), "FINAL(ok)"],
        on_event=count,
    )
    assert rlm.completion("ctx").response == "ok"
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    shown = root_messages(lm, 1)
    assert "the sandbox also dropped" in shown
    assert "chars...]" in shown  # the 20,000-character cut of what the model sees
    assert received < 1_100_000  # the default cap: 1,000,000 characters per stream
    assert growth_mb < 150, f"orchestrator peak RSS grew by {growth_mb:.0f} MB"


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
            # The agent and its worker; jailed, the worker is three: the process the agent
            # spawned (outside), the jail's init and the worker itself.
            jailed = sandbox.provider_state.isolation == "namespaces"
            assert len(_agent_processes() - before_processes) == (4 if jailed else 2)
            assert len(_sandbox_dirs() - before_dirs) == 1
        finally:
            await provider.release(sandbox)

    asyncio.run(check())
