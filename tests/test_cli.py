"""The CLI as a user runs it: a real subprocess, the scripted LM over HTTP, a real sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, SERVER_TOKEN, ServerProcess, repl
from typer.testing import CliRunner

from rlm_orchestrator.cli import app
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

CLI = [sys.executable, "-m", "rlm_orchestrator.cli"]


def run_cli(
    *args: str, stdin: str | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, **(extra_env or {})}
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=90, check=False
    )


def test_run_prints_answer_on_stdout_and_progress_on_stderr(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    lm.set_sequence(
        "cli-root",
        [repl("n = len(context.split())\nprint('words', n)"), "FINAL(there are 3 words)"],
    )
    context_file = tmp_path / "context.txt"
    context_file.write_text("alpha beta gamma")
    result = run_cli(
        "run",
        "--context",
        str(context_file),
        "--query",
        "How many words?",
        "--model",
        "cli-root",
        "--api-base",
        lm.base_url,
        "--log-dir",
        str(tmp_path / "logs"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "there are 3 words\n"
    assert "words 3" in result.stderr and "turn 1" in result.stderr
    # The key came from the environment, reached the LM server, and was not logged.
    assert lm.requests[0].api_key == API_KEY
    log_text = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.jsonl"))
    assert '"type": "metadata"' in log_text and API_KEY not in log_text


def run_in_process(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """The CLI in this process (litellm already imported): fast; the sandbox is still real."""
    result = CliRunner().invoke(app, list(args), input=stdin)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_run_reads_json_context_from_stdin(lm: ScriptedLMServer) -> None:
    lm.set_sequence("cli-root", [repl("print(sorted(context))"), "FINAL(done)"])
    args = ["run", "-c", "-", "-q", "keys?", "--model", "cli-root", "--api-base", lm.base_url]
    code, stdout, stderr = run_in_process(
        *args, "--context-format", "json", "--quiet", stdin=json.dumps({"b": 1, "a": 2})
    )
    assert code == 0, stderr
    assert stdout == "done\n" and stderr == ""
    shown = lm.requests_for("cli-root")[1].messages[-2]["content"]
    assert "['a', 'b']" in shown


def test_run_takes_the_answer_convention(lm: ScriptedLMServer) -> None:
    # Under "answer_dict" the model answers through `answer`; FINAL(...) in text is no answer.
    lm.set_sequence(
        "cli-root", [repl("answer['content'] = 'from the dict'\nanswer['ready'] = True")]
    )
    args = ["run", "-c", "-", "-q", "?", "--model", "cli-root", "--api-base", lm.base_url]
    code, stdout, stderr = run_in_process(
        *args, "--answer-convention", "answer_dict", "--quiet", stdin="ctx"
    )
    assert code == 0, stderr
    assert stdout == "from the dict\n"
    assert '"ready"' in lm.requests_for("cli-root")[0].messages[0]["content"]  # the prompt
    code, _, stderr = run_in_process(*args, "--answer-convention", "bogus", stdin="ctx")
    assert code == 2 and "--answer-convention" in stderr


def test_run_reports_lm_failure_clearly(
    lm: ScriptedLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context_file = tmp_path / "c.txt"
    context_file.write_text("x")
    monkeypatch.setenv("RLM_RUN_MAX_ITERATIONS", "2")
    # Nothing scripted: the server answers 500 to every attempt.
    code, stdout, stderr = run_in_process(
        "run", "-c", str(context_file), "-q", "?", "--model", "cli-root", "--api-base", lm.base_url
    )
    assert code == 1
    assert "LMError" in stderr and "500" in stderr and stdout == ""


def test_run_rejects_invalid_json_context(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, stderr = run_in_process("run", "-c", str(bad), "-q", "?")
    assert code == 2 and "not valid JSON" in stderr


# Modules that take most of a second or more to import: none may load before `run` has
# refused its arguments (the refusal comes at once, not after seconds of silence).
SLOW_IMPORTS = ("litellm", "openai", "httpx", "grpc", "rlm_orchestrator.rlm")


def test_run_refuses_a_bad_setting_before_any_slow_import() -> None:
    probe = (
        "import sys\n"
        "from rlm_orchestrator.cli import main\n"
        "sys.argv = ['rlm-orchestrator', 'run', '-c', '-', '-q', '?', '--max-iterations', '0']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print(*sorted(sys.modules), sep='\\n')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    first, *modules = result.stdout.splitlines()
    assert first == "exit 2" and "--max-iterations" in result.stderr
    loaded = [m for m in modules if m in SLOW_IMPORTS or m.split(".")[0] in SLOW_IMPORTS]
    assert loaded == []


def test_demo_finds_the_hidden_fact() -> None:
    code, stdout, stderr = run_in_process("demo", "--size", "200000", "--quiet")
    assert code == 0, stderr
    assert stdout.strip() == "The secret launch code is 7-ALPHA-42."


def test_run_through_a_server(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer, tmp_path: Path
) -> None:
    lm.set_sequence("root", [repl("print('remote', len(context))"), "FINAL(remote answer)"])
    context_file = tmp_path / "context.txt"
    context_file.write_text("four")
    args = ["run", "-c", str(context_file), "-q", "?", "--server", orchestrator_server.address]
    code, stdout, stderr = run_in_process(*args, "--token", SERVER_TOKEN)
    assert code == 0, stderr
    assert stdout == "remote answer\n" and "remote 4" in stderr
    code, _, stderr = run_in_process(*args, "--token", "wrong")
    assert code == 1 and "AuthenticationError" in stderr


# --- what run reports (issue 19): turns, how the answer was reached, usage; ```python fences ---


def test_run_json_reports_turns_source_and_usage_without_the_context(lm: ScriptedLMServer) -> None:
    lm.set_sequence("cli-root", [repl("x = context.upper()"), "FINAL_VAR(x)"])
    args = ["run", "-c", "-", "-q", "?", "--model", "cli-root", "--api-base", lm.base_url]
    code, stdout, stderr = run_in_process(*args, "--json", "--quiet", stdin="CONTEXT-MARKER")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert (data["response"], data["iterations"], data["answer_source"]) == (
        "CONTEXT-MARKER",
        2,
        "final_var",
    )
    assert data["usage_summary"]["model_usage_summaries"]["cli-root"]["total_calls"] == 2
    assert "prompt" not in data and stdout.count("CONTEXT-MARKER") == 1  # the answer, only


def test_run_flags_an_out_of_turns_answer_even_when_quiet(lm: ScriptedLMServer) -> None:
    lm.set_sequence("cli-root", [repl("x = 1"), "my raw last reply"])
    args = ["run", "-c", "-", "-q", "?", "--model", "cli-root", "--api-base", lm.base_url]
    code, stdout, stderr = run_in_process(*args, "--max-iterations", "1", "--quiet", stdin="c")
    assert code == 0, stderr
    assert stdout == "my raw last reply\n"
    (note,) = stderr.strip().splitlines()
    assert note.startswith("note: no final answer within 1 turn(s)") and "out_of_turns" in note
    lm.set_sequence("cli-root", [repl("x = 1"), "my raw last reply"])
    code, stdout, stderr = run_in_process(*args, "--max-iterations", "1", stdin="c")
    assert "1 turn(s), out_of_turns, 2 LM calls" in stderr


def test_run_takes_code_fences(lm: ScriptedLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    python_only = ["```python\nx = 6 * 7\n```", "FINAL_VAR(x)"]
    args = ["run", "-c", "-", "-q", "?", "--model", "cli-root", "--api-base", lm.base_url]
    lm.set_sequence("cli-root", python_only)
    code, stdout, stderr = run_in_process(*args, "--code-fences", "repl,python", stdin="c")
    assert code == 0, stderr
    assert stdout == "42\n"
    lm.set_sequence("cli-root", python_only)
    monkeypatch.setenv("RLM_RUN_CODE_FENCES", "python")
    code, stdout, stderr = run_in_process(*args, "--quiet", stdin="c")
    assert (code, stdout) == (0, "42\n"), stderr
    code, _, stderr = run_in_process(*args, "--code-fences", "repl,", stdin="c")
    assert code == 2 and "--code-fences" in stderr


def test_run_through_a_server_takes_code_fences_and_reports_the_source(
    orchestrator_server: ServerProcess, lm: ScriptedLMServer
) -> None:
    lm.set_sequence("root", ["```python\nx = 'py'\n```", "FINAL_VAR(x)"])
    args = ["run", "-c", "-", "-q", "?", "--server", orchestrator_server.address]
    code, stdout, stderr = run_in_process(
        *args, "--token", SERVER_TOKEN, "--code-fences", "repl,python", "--json", stdin="c"
    )
    assert code == 0, stderr
    data = json.loads(stdout)
    assert (data["response"], data["iterations"], data["answer_source"]) == ("py", 2, "final_var")
