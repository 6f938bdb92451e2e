"""A fleet of 4 agent containers on a private Docker network of their own (real engine).

The agents run `--fleet` with TLS and a token, locked down like Docker sandboxes, on an
internal network (no route anywhere); the orchestrator (this process) dials their addresses.
"""

from __future__ import annotations

import ast
import asyncio
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import ROOT_MODEL, SUB_MODEL, repl
from fleet_support import TOKEN, DockerFleet, _address_of

from rlm_orchestrator import RLM
from rlm_orchestrator import events as ev
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.launch import TOKEN_ENV
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, ScriptedLMServer
from rlm_wire.auth import bearer_metadata, channel_credentials

pytestmark = pytest.mark.docker


@pytest.fixture
def fleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


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


SET_ASIDE_SECONDS = 20.0  # covers the cut, the agent's restart and 4 child sessions


def child_hostname(request: RecordedRequest) -> str:
    """A child RLM answers with the hostname (container id) of the agent it ran on."""
    if len(request.messages) == 3:
        return repl("import socket\nh = socket.gethostname()")
    return "FINAL_VAR(h)"


def test_an_agent_cut_off_mid_session_is_replaced_and_set_aside(
    docker_fleet: DockerFleet, fleet_env: None, make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    """The session moves at once; the lost agent, even once back, is leased to no child RLM of
    the same orchestrator while set aside, and is leased again after that."""
    block_started, recovering, victim_back = threading.Event(), threading.Event(), threading.Event()
    victim_host: list[str] = []
    phase_ends: list[float] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.CodeBlockStarted) and event.iteration == 1:
            block_started.set()

    def children_while_set_aside(request: RecordedRequest) -> str:
        recovering.set()
        assert victim_back.wait(60), "the cut-off agent did not come back"
        return repl(
            "print('kept' in globals())\n"
            "aside = [rlm_query('where') for _ in range(4)]\nprint('aside', aside)"
        )

    def children_until_it_serves_again(request: RecordedRequest) -> str:
        phase_ends.append(time.monotonic())
        return repl(
            f"import time\nback, end = [], time.time() + 30\n"
            f"while {victim_host[0]!r} not in back and time.time() < end:\n"
            "    back.append(rlm_query('where'))\nprint('back', back)"
        )

    # The block asks (with its agent's hostname) whether to sleep: yes the first time (the
    # agent is cut while it sleeps). Run again on the new agent after the cut, its request
    # differs (another hostname), so it is asked anew, not answered from the record: no.
    asked = threading.Event()

    def sleep_once(request: RecordedRequest) -> str:
        answer = "no" if asked.is_set() else "yes"
        asked.set()
        return answer

    lm.add_rule(Rule(sleep_once, model=SUB_MODEL, contains="sleep? "))
    lm.add_rule(Rule(child_hostname, model=SUB_MODEL))
    lm.set_sequence(
        ROOT_MODEL,
        [
            repl(
                "import socket, time\nkept = 1\n"
                "if llm_query('sleep? ' + socket.gethostname()) == 'yes':\n    time.sleep(60)"
            ),
            Rule(children_while_set_aside),
            Rule(children_until_it_serves_again),
            "FINAL(survived)",
        ],
    )
    options = docker_fleet.options(unhealthy_seconds=SET_ASIDE_SECONDS)
    rlm = make_rlm(environment="fleet", environment_kwargs=options, on_event=on_event, max_depth=2)
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(rlm.completion("ctx").response))
    worker.start()
    try:
        assert block_started.wait(60) and asked.wait(60)
        victim = next(c for c in docker_fleet.containers if _leased(c))
        address = docker_fleet.addresses[docker_fleet.containers.index(victim)]
        victim_host.append(victim.id[:12])  # its hostname
        cut = time.monotonic()
        docker_fleet.network.disconnect(victim, force=True)
        victim.kill()
        # Bounded: not the minutes keepalive alone would take.
        assert recovering.wait(45), "the session did not move to another agent"
        # The lost agent comes back: restarted and reconnected at its address, serving.
        victim.start()
        docker_fleet.network.connect(victim)
        victim.reload()
        assert f"{_address_of(victim, docker_fleet.network.name)}:50051" == address
        _wait_serving(docker_fleet, address)
    finally:
        victim_back.set()
        worker.join(120)
    assert results == ["survived"]
    shown = str(lm.requests_for(ROOT_MODEL)[1].messages)
    assert "SandboxError" not in shown  # the namespace was rebuilt and the block run again
    after_aside = str(lm.requests_for(ROOT_MODEL)[2].messages)
    assert "True" in after_aside  # `kept` survived the agent
    # The set-aside began after the cut: the 4 children all ran inside it.
    assert phase_ends[0] - cut < SET_ASIDE_SECONDS, "too slow to test the set-aside window"
    aside = _printed_list("aside", after_aside)
    assert len(aside) == 4 and victim_host[0] not in aside, "a set-aside agent was leased again"
    back = _printed_list("back", str(lm.requests_for(ROOT_MODEL)[3].messages))
    assert back[-1] == victim_host[0], "the agent was not leased again after its set-aside"


def _printed_list(label: str, shown: str) -> list[str]:
    found = re.search(label + r" (\[[^\]]*\])", shown)
    assert found, f"no {label!r} line in {shown[-500:]!r}"
    return list(ast.literal_eval(found.group(1)))


def _wait_serving(fleet: DockerFleet, address: str) -> None:
    async def wait() -> None:
        agent = AgentClient(
            address,
            credentials=channel_credentials(fleet.pki.ca_cert),
            metadata=bearer_metadata(TOKEN),
            tls_server_name="localhost",
        )
        try:
            await agent.wait_ready(30)
        finally:
            await agent.close()

    asyncio.run(wait())


def _leased(container: Any) -> bool:
    logs = container.logs().decode(errors="replace")
    return logs.count("leased to session") > logs.count("resetting the sandbox")
