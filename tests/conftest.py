"""Shared fixtures: one scripted LM server per session, RLM factories, and the leak check.

Every test is checked for leaks: no new agent or worker process, no sandbox temp dir and no
socket may outlive it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Secrets the orchestrator holds during the tests: none of them may reach a sandbox.
SECRET_ENV = {
    "OPENAI_API_KEY": "sk-orchestrator-secret-openai",
    "ANTHROPIC_API_KEY": "sk-orchestrator-secret-anthropic",
    "RLM_TEST_SECRET_TOKEN": "orchestrator-secret-token",
}
os.environ.update(SECRET_ENV)
# Sandboxes of this run carry this label, and their temp dirs live under this run's own
# temp dir, so that the leak check sees only this run (even beside another test run).
OWNER = f"pytest-{os.getpid()}"
os.environ["RLM_SANDBOX_OWNER"] = OWNER
RUN_TMP = Path(tempfile.mkdtemp(prefix="rlm-tests-"))
os.environ["TMPDIR"] = str(RUN_TMP)
tempfile.tempdir = str(RUN_TMP)

from rlm_orchestrator import RLM  # noqa: E402
from rlm_orchestrator.testing.scripted_lm import Script, ScriptedLMServer  # noqa: E402

ROOT_MODEL, SUB_MODEL, OTHER_MODEL = "root", "sub", "other"
API_KEY = "sk-scripted-test-key"


def _agent_processes() -> set[int]:
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        if "sandbox_agent" not in " ".join(process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get("RLM_SANDBOX_OWNER") == OWNER:
                found.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _sandbox_dirs() -> set[str]:
    return {p.name for p in RUN_TMP.glob("rlm-*")}


@pytest.fixture(scope="session", autouse=True)
def run_tmp() -> Iterator[Path]:
    yield RUN_TMP
    shutil.rmtree(RUN_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fails the test if it leaves an agent/worker process or a sandbox directory behind."""
    processes_before, dirs_before = _agent_processes(), _sandbox_dirs()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked_processes = _agent_processes() - processes_before
        leaked_dirs = _sandbox_dirs() - dirs_before
        if not (leaked_processes or leaked_dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked_processes, f"leaked sandbox processes: {sorted(leaked_processes)}"
    assert not leaked_dirs, f"leaked sandbox directories: {sorted(leaked_dirs)}"


@pytest.fixture(scope="session")
def lm_server() -> Iterator[ScriptedLMServer]:
    with ScriptedLMServer() as server:
        yield server


@pytest.fixture
def lm(lm_server: ScriptedLMServer) -> Iterator[ScriptedLMServer]:
    """The session's scripted LM, emptied for this test."""
    lm_server.reset()
    yield lm_server
    lm_server.reset()


def backend_kwargs(server: ScriptedLMServer, model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_name": model,
        "api_base": server.base_url,
        "api_key": API_KEY,
        "retry_initial_delay": 0.01,
        **extra,
    }


@pytest.fixture
def make_rlm(lm: ScriptedLMServer) -> Callable[..., RLM]:
    """RLM against the scripted server: root model "root", sub-calls to "sub"."""

    def factory(
        *,
        root: list[str] | None = None,
        sub: list[str] | None = None,
        script: Script | None = None,
        **kwargs: Any,
    ) -> RLM:
        if script is not None:
            lm.set_script(script)
        if root is not None:
            lm.set_sequence(ROOT_MODEL, list(root))
        if sub is not None:
            lm.set_sequence(SUB_MODEL, list(sub))
        kwargs.setdefault("backend", "openai")
        kwargs.setdefault("backend_kwargs", backend_kwargs(lm, ROOT_MODEL))
        kwargs.setdefault("other_backends", ["openai"])
        kwargs.setdefault("other_backend_kwargs", [backend_kwargs(lm, SUB_MODEL)])
        kwargs.setdefault("environment", "local")
        return RLM(**kwargs)

    return factory


def repl(code: str) -> str:
    """A root-LM response running one block."""
    return f"```repl\n{code}\n```"
