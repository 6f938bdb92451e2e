"""A fleet of 4 agent containers on a private Docker network of their own (real engine).

The agents run `--fleet` with TLS and a token, locked down like Docker sandboxes, on an
internal network (no route anywhere); the orchestrator (this process) dials their addresses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import ROOT_MODEL, repl
from fleet_support import TOKEN, DockerFleet

from rlm_orchestrator import RLM
from rlm_orchestrator import events as ev
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer

pytestmark = pytest.mark.docker


@pytest.fixture
def fleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_FLEET_TOKEN", TOKEN)


def isolation_reply(request: RecordedRequest) -> str:
    if len(request.messages) == 3:
        return repl(
            "import os\nseen = sorted(os.listdir('.'))\nprior = 'mine' in globals()\n"
            "mine = context\nopen(context, 'w').write(context)\nanswer = [context, seen, prior]"
        )
    return "FINAL_VAR(answer)"


def test_16_concurrent_completions_spread_over_4_agents_in_isolation(
    docker_fleet: DockerFleet, fleet_env: None, make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    lm.add_rule(Rule(isolation_reply, model=ROOT_MODEL))

    def one(n: int) -> str:
        rlm = make_rlm(environment="fleet", environment_kwargs=docker_fleet.options())
        return rlm.completion(f"session{n}").response

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(16)))
    # No session ever saw another's file or variable.
    assert answers == [f"['session{n}', [], False]" for n in range(16)]


def test_an_agent_cut_off_mid_session_is_replaced_and_set_aside(
    docker_fleet: DockerFleet, fleet_env: None, make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    block_started = threading.Event()

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.CodeBlockStarted) and event.iteration == 0:
            block_started.set()

    lm.set_sequence(
        ROOT_MODEL,
        [
            repl("import socket, time\nhost = socket.gethostname()\ntime.sleep(60)"),
            repl("print('host' in globals())"),
            "FINAL(survived)",
        ],
    )
    rlm = make_rlm(
        environment="fleet", environment_kwargs=docker_fleet.options(), on_event=on_event
    )
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(rlm.completion("ctx").response))
    worker.start()
    assert block_started.wait(60)
    victim = next(c for c in docker_fleet.containers if _leased(c))
    started = time.monotonic()
    docker_fleet.network.disconnect(victim, force=True)
    victim.kill()
    worker.join(60)
    assert results == ["survived"]
    assert time.monotonic() - started < 45  # bounded: not the minutes keepalive alone would take
    shown = str(lm.requests_for(ROOT_MODEL)[1].messages)
    assert "SandboxError" in shown and "moved to a new sandbox" in shown
    assert "False" in str(lm.requests_for(ROOT_MODEL)[2].messages)
    # The lost agent comes back: restarted and reconnected, it serves again.
    victim.start()
    docker_fleet.network.connect(victim)
    victim.reload()


def _leased(container: Any) -> bool:
    logs = container.logs().decode(errors="replace")
    return logs.count("leased to session") > logs.count("resetting the sandbox")
