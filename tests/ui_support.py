"""A traced, scripted completion for the viewer's tests, and a headless chromium to look at it.

The completion runs in a subprocess (a tracer provider is process-global) that records into a
SQLite trace store with content (RLM_TRACE_CONTENT), against the session's scripted LM.
Chromium is Debian's (`.ci/install-test-tools` installs it under CI): `--dump-dom` gives the
DOM after the page's scripts ran (`--virtual-time-budget` lets its fetches finish first) and
`--screenshot` a PNG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, SUB_MODEL, repl

from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

SUB_CALLS = 15
# Each sub-call waits this long in the scripted LM: long enough that the 15 overlap visibly.
SUB_CALL_DELAY = 0.4
FIRST_TURN_MESSAGES = 3  # system prompt, context metadata, the turn's user prompt

ROOT_TURN_1 = "Let me ask 15 sub-models at once, then a child RLM.\n" + repl(
    f"prompts = [f'item {{i}}' for i in range({SUB_CALLS})]\n"
    "answers = llm_query_batched(prompts)\n"
    "print(len(answers), answers[0])\n"
    "child = rlm_query('the child question')\n"
    "print('child said', child)"
)
ROOT_TURN_2 = "All done.\nFINAL_VAR(child)"

_SCRIPT = """
import json, sys
from rlm_orchestrator import RLM
kwargs = json.loads(sys.argv[1])
rlm = RLM(**kwargs)
result = rlm.completion("the parent's context")
print(json.dumps({"response": result.response, "usage": result.usage_summary.to_dict()}))
"""


def _child(request: RecordedRequest) -> str:
    """The child RLM's root model: one block, then its answer."""
    if len(request.messages) == FIRST_TURN_MESSAGES:
        return repl("r = context.upper()\nprint(r)")
    return "FINAL_VAR(r)"


def script_completion(lm: ScriptedLMServer, root: list[str] | None = None) -> None:
    """Root: turn 1 runs 15 concurrent sub-calls and a child RLM, turn 2 answers."""
    lm.set_sequence("root", root or [ROOT_TURN_1, ROOT_TURN_2])
    lm.add_rule(
        Rule(r"answer \1", model=SUB_MODEL, regex=r"^item (\d+)$", delay_seconds=SUB_CALL_DELAY)
    )
    lm.add_rule(Rule(_child, model=SUB_MODEL))


@dataclass
class Recorded:
    store: Path
    response: str
    usage: dict[str, Any]


def run_traced(lm: ScriptedLMServer, store: Path, *, max_depth: int = 2) -> Recorded:
    """One completion in a subprocess, traced into `store` with content."""
    prices = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}

    def backend(model: str) -> dict[str, Any]:
        return {"model_name": model, "api_base": lm.base_url, "api_key": API_KEY, **prices}

    kwargs = {
        "backend_kwargs": backend("root"),
        "other_backends": ["openai"],
        "other_backend_kwargs": [backend(SUB_MODEL)],
        "max_depth": max_depth,
        "max_iterations": 4,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RLM_TRACE"))}
    env |= {"RLM_TRACE_STORE": str(store), "RLM_TRACE_CONTENT": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(kwargs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Recorded(store, result["response"], result["usage"])


def chromium() -> str:
    """Debian's chromium; skips (fails in CI: tests/skip_policy.py) when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (.ci/install-test-tools installs it)")
    return found


def _browse(url: str, *args: str, budget_ms: int = 8000) -> subprocess.CompletedProcess[str]:
    # A profile of its own, removed after: no state shared between runs, nothing left.
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            chromium(),
            "--headless",
            "--no-sandbox",  # root in CI's container: chromium's own sandbox cannot start
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *args,
            url,
        ]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=90, check=False, cwd=profile
        )


def dump_dom(url: str) -> str:
    done = _browse(url, "--dump-dom")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def screenshot(url: str, path: Path, width: int = 1400, height: int = 1800) -> Path:
    done = _browse(url, f"--screenshot={path}", f"--window-size={width},{height}")
    assert done.returncode == 0 and path.is_file(), done.stderr[-3000:]
    return path
