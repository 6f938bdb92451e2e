"""examples/ run as a user runs them: a subprocess each, against the session's real server
(conftest) whose models are scripted per example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT_MODEL, SERVER_TOKEN, SUB_MODEL, ServerProcess, repl

from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, server: ServerProcess | None = None) -> str:
    env = {**os.environ, "RLM_SERVER_TOKEN": SERVER_TOKEN}
    env.pop("LM_BASE_URL", None)
    if server is not None:
        env["RLM_SERVER"] = server.address
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_sync_client(orchestrator_server: ServerProcess, lm: ScriptedLMServer) -> None:
    lm.set_sequence(
        ROOT_MODEL,
        [repl("errors = str(context.count('ERROR'))\nprint(errors)"), "FINAL_VAR(errors)"],
    )
    lm.set_sequence(SUB_MODEL, ["hello"])
    out = _run("sync_client.py", orchestrator_server)
    assert "answer: 15" in out
    assert f"(root {ROOT_MODEL}, sub-calls {SUB_MODEL})" in out
    assert f"plain LM call: hello ({SUB_MODEL}," in out


def test_async_client(orchestrator_server: ServerProcess, lm: ScriptedLMServer) -> None:
    lm.add_rule(Rule(repl("answer = context.upper()\nFINAL_VAR('answer')"), model=ROOT_MODEL))
    out = _run("async_client.py", orchestrator_server)
    assert "fox: THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG" in out
    assert "hello: HELLO WORLD" in out


def test_streaming_events(orchestrator_server: ServerProcess, lm: ScriptedLMServer) -> None:
    lm.set_sequence(
        ROOT_MODEL,
        [
            repl("summary = llm_query('Summarise: ' + context[:500])\nprint(summary)"),
            "FINAL_VAR(summary)",
        ],
    )
    lm.set_sequence(SUB_MODEL, ["A hero visits 199 cities."])
    out = _run("streaming_events.py", orchestrator_server)
    assert "-- turn 1" in out and "-- turn 2" in out
    assert f"llm_query -> {SUB_MODEL}" in out
    assert "| A hero visits 199 cities." in out
    assert "answer after 2 turn(s): A hero visits 199 cities." in out


def test_sessions(orchestrator_server: ServerProcess, lm: ScriptedLMServer) -> None:
    lm.set_sequence(
        ROOT_MODEL,
        [
            repl("first_words = len(context.split())"),
            "FINAL(noted)",
            repl("more = str(len(context_1.split()) - first_words)"),
            "FINAL_VAR(more)",
        ],
    )
    out = _run("sessions.py", orchestrator_server)
    assert "first: noted" in out and "second: 3" in out
    assert "closed: NOT_FOUND" in out


def test_custom_openai_server() -> None:
    out = _run("custom_openai_server.py")  # its own scripted server; no orchestrator
    assert "answer: 10" in out


@pytest.mark.parametrize("name", ["real_provider.py"])
def test_the_examples_not_run_here_at_least_import(name: str) -> None:
    # Needs a provider's key and the network: imported (its module-level code runs), not run.
    done = subprocess.run(
        [sys.executable, "-c", f"import runpy; runpy.run_path({str(EXAMPLES / name)!r})"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
