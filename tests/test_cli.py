"""The CLI as a user runs it: a real subprocess, the scripted LM over HTTP, a real sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import API_KEY, repl

from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

CLI = [sys.executable, "-m", "rlm_orchestrator.cli"]


def run_cli(*args: str, stdin: str | None = None, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, **(extra_env or {})}
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=90, check=False)


def test_run_prints_answer_on_stdout_and_progress_on_stderr(lm: ScriptedLMServer, tmp_path: Path) -> None:
    lm.set_sequence("cli-root", [repl("n = len(context.split())\nprint('words', n)"), "FINAL(there are 3 words)"])
    context_file = tmp_path / "context.txt"
    context_file.write_text("alpha beta gamma")
    result = run_cli("run", "--context", str(context_file), "--query", "How many words?",
                     "--model", "cli-root", "--api-base", lm.base_url, "--log-dir", str(tmp_path / "logs"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "there are 3 words\n"
    assert "words 3" in result.stderr and "turn 1" in result.stderr
    # The key came from the environment, reached the LM server, and was not logged.
    assert lm.requests[0].api_key == API_KEY
    log_text = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.jsonl"))
    assert '"type": "metadata"' in log_text and API_KEY not in log_text


def test_run_reads_json_context_from_stdin(lm: ScriptedLMServer) -> None:
    lm.set_sequence("cli-root", [repl("print(sorted(context))"), "FINAL(done)"])
    result = run_cli("run", "-c", "-", "-q", "keys?", "--model", "cli-root", "--api-base", lm.base_url,
                     "--context-format", "json", "--quiet", stdin=json.dumps({"b": 1, "a": 2}))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n" and result.stderr == ""
    shown = lm.requests_for("cli-root")[1].messages[-2]["content"]
    assert "['a', 'b']" in shown


def test_run_reports_lm_failure_clearly(lm: ScriptedLMServer, tmp_path: Path) -> None:
    context_file = tmp_path / "c.txt"
    context_file.write_text("x")
    # Nothing scripted: the server answers 500 to every attempt.
    result = run_cli("run", "-c", str(context_file), "-q", "?", "--model", "cli-root",
                     "--api-base", lm.base_url, extra_env={"RLM_MAX_ITERATIONS": "2"})  # fmt: skip
    assert result.returncode == 1
    assert "LMError" in result.stderr and result.stdout == ""


def test_demo_finds_the_hidden_fact() -> None:
    result = run_cli("demo", "--size", "200000", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The secret launch code is 7-ALPHA-42."
