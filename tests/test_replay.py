"""A sandbox lost mid-session is rebuilt by replay (issue 20): the variables come back, the model
is told nothing, and no model call is made again; code that read the clock diverges, and then
the model is told what was lost.

The agent is killed with SIGKILL from outside (the test), between blocks: the local agent's
process, or the Docker container.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from conftest import OWNER, ROOT_MODEL, SUB_MODEL, _our_containers, repl, require_docker

from rlm_orchestrator import RLM
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

BUILD = [
    repl("a = llm_query('first fact')\nimport random\nrandom.seed(7)\nb = random.random()"),
    repl("c = [a, b]\nd = {'n': len(context)}"),
    repl("e = llm_query_batched(['x', 'y'])\nprint('built')"),
]
CHECK = "print(a, round(b, 6), c == [a, b], d, e)"


def kill_the_agent(environment: str) -> int:
    """SIGKILL to this test's sandbox agent (its process, or its container): how many."""
    killed = 0
    if environment == "docker":
        import docker

        client = docker.from_env()
        try:
            for container_id in _our_containers():
                client.containers.get(container_id).kill()
                killed += 1
        finally:
            client.close()
        return killed
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "rlm-agent":
            continue
        try:
            if process.environ().get("RLM_SANDBOX_OWNER") == OWNER:
                os.kill(process.pid, signal.SIGKILL)
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return killed


def killing_first(environment: str, reply: str) -> Callable[[RecordedRequest], str]:
    """A root reply that kills the agent before it is given (so between two blocks)."""

    def answer(request: RecordedRequest) -> str:
        assert kill_the_agent(environment) == 1
        return reply

    return answer


def make(lm: ScriptedLMServer, environment: str, **kwargs: Any) -> RLM:
    from conftest import SANDBOX_IMAGE, backend_kwargs

    extra = {"image": SANDBOX_IMAGE} if environment == "docker" else {}
    return RLM(
        backend="openai",
        backend_kwargs=backend_kwargs(lm, ROOT_MODEL),
        other_backends=["openai"],
        other_backend_kwargs=[backend_kwargs(lm, SUB_MODEL)],
        environment=environment,
        environment_kwargs=extra,
        **kwargs,
    )


@pytest.mark.parametrize("environment", ["local", "docker"])
def test_a_killed_agent_is_rebuilt_with_the_same_variables(
    lm: ScriptedLMServer, environment: str
) -> None:
    if environment == "docker":
        require_docker()
    for prompt, answer in (("first fact", "alpha"), ("x", "x1"), ("y", "y1")):
        lm.add_rule(Rule(answer, model=SUB_MODEL, regex=f"^{prompt}$"))
    check = Rule(killing_first(environment, repl(CHECK)))
    lm.set_sequence(ROOT_MODEL, [*BUILD, check, "FINAL(done)"])
    assert make(lm, environment).completion("the context").response == "done"
    shown = lm.requests_for(ROOT_MODEL)[4].messages[-2]["content"]
    assert "alpha 0.323833 True {'n': 11} ['x1', 'y1']" in shown
    # The model is told nothing, and nothing was asked of a model twice.
    assert "SandboxError" not in str(lm.requests_for(ROOT_MODEL)[4].messages)
    assert "lost" not in shown
    assert len(lm.requests_for(SUB_MODEL)) == 3
    assert len(lm.requests_for(ROOT_MODEL)) == 5


def test_a_block_that_read_the_clock_diverges_and_the_model_is_told(
    lm: ScriptedLMServer,
) -> None:
    clock = repl("import time\nstamp = time.time()\nprint(stamp)")
    check = Rule(killing_first("local", repl("print('stamp' in globals())")))
    after = repl("print('kept' in globals(), 'stamp' in globals())")
    lm.set_sequence(ROOT_MODEL, [repl("kept = 1"), clock, check, after, "FINAL(done)"])
    assert make(lm, "local").completion("ctx").response == "done"
    shown = lm.requests_for(ROOT_MODEL)[3].messages[-2]["content"]
    assert "SandboxError" in shown and "diverged at block 2: output differs" in shown
    # What ran until the divergence is there (the clock's block ran again, with a new time).
    assert "True True" in lm.requests_for(ROOT_MODEL)[4].messages[-2]["content"]
