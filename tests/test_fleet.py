"""Fleet mode: long-running agents leased one session at a time, over TLS with a token.

The agents here are real `python -m sandbox_agent --fleet` processes on 127.0.0.1 (a Docker
fleet on a private network is the next step, see the README).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT_MODEL, repl
from fleet_support import run

from rlm_orchestrator import RLM
from rlm_orchestrator.config import FleetConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.fleet import FleetProvider
from rlm_orchestrator.sandbox.launch import TOKEN_ENV, AgentLaunch, token_environment
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from rlm_wire.auth import bearer_metadata, channel_credentials
from tests.fakes.certs import TestPKI, make_test_pki

TOKEN = "fleet-token-for-tests"


@dataclass
class Fleet:
    pki: TestPKI
    addresses: list[str]
    processes: list[subprocess.Popen[str]]

    def options(self, **extra: object) -> dict[str, object]:
        return {"agents": self.addresses, "tls_ca_file": str(self.pki.ca_cert), **extra}


def start_agent(
    directory: Path, pki: TestPKI, listen: str = "127.0.0.1:0"
) -> tuple[subprocess.Popen[str], str]:
    """A fleet agent process on 127.0.0.1, and its address once it listens."""
    command = AgentLaunch(
        listen=listen,
        workdir=str(directory / "work"),
        state_dir=str(directory / "state"),
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        fleet=True,
        lease_ttl_seconds=3,
    ).argv(sys.executable)
    env = {**os.environ, **token_environment(TOKEN)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, f"localhost:{process.stdout.readline().split()[-1]}"


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    pki = make_test_pki(tmp_path / "pki")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    processes, addresses = [], []
    for n in range(3):
        process, address = start_agent(tmp_path / f"a{n}", pki)
        addresses.append(address)
        processes.append(process)
    yield Fleet(pki, addresses, processes)
    for process in processes:  # with any a test started in place of one
        process.terminate()
        process.wait(10)
        if process.stdout:
            process.stdout.close()


def client(fleet: Fleet, address: str, token: str | None = TOKEN) -> AgentClient:
    metadata = bearer_metadata(token) if token else ()
    return AgentClient(
        address, credentials=channel_credentials(fleet.pki.ca_cert), metadata=metadata
    )


async def test_an_agent_serves_one_lease_at_a_time_and_refuses_strangers(fleet: Fleet) -> None:
    address = fleet.addresses[0]
    holder, other, stranger = (
        client(fleet, address),
        client(fleet, address),
        client(fleet, address, None),
    )
    try:
        await holder.lease("session-a", "test", 30)
        with pytest.raises(SandboxError, match=r"FAILED_PRECONDITION.*leased by another session"):
            await other.lease("session-b", "test", 30)
        with pytest.raises(SandboxError, match="FAILED_PRECONDITION"):
            await run(other, "x = 1")  # a call without the lease
        with pytest.raises(SandboxError, match="UNAUTHENTICATED"):
            await stranger.lease("session-c", "test", 30)
        assert await run(holder, "print('mine')") == "mine\n"
        await holder.release_lease()
    finally:
        for agent in (holder, other, stranger):
            await agent.close()
    plaintext = AgentClient(
        address.replace("localhost", "127.0.0.1"), metadata=bearer_metadata(TOKEN)
    )
    try:
        with pytest.raises(SandboxError):
            await plaintext.wait_ready(2)  # no TLS, no service
    finally:
        await plaintext.close()


async def test_an_execute_stream_kept_open_does_not_outlive_its_lease(fleet: Fleet) -> None:
    # The client keeps its Execute stream open between blocks; the lease is checked again at
    # every block, not only when the stream opened.
    address = fleet.addresses[2]
    first, second = client(fleet, address), client(fleet, address)
    try:
        await first.lease("first", "test", 30)
        assert await run(first, "print('mine')") == "mine\n"
        kept = first._execution
        assert kept is not None and kept.usable
        await first.release_lease()
        await second.lease("second", "test", 30)
        with pytest.raises(SandboxError, match="FAILED_PRECONDITION"):
            await run(first, "print('not yours')")
        assert first._execution is None  # dropped with the failed call
        assert await run(second, "print('theirs')") == "theirs\n"
        await second.release_lease()
    finally:
        await first.close()
        await second.close()


async def test_nothing_of_a_session_is_visible_to_the_next(fleet: Fleet) -> None:
    address = fleet.addresses[1]
    first = client(fleet, address)
    try:
        await first.lease("first", "test", 30)
        await first.load_value("context_0", "secret context", alias="context")
        await run(first, "kept = 42\nopen('notes.txt', 'w').write('private')")
        await first.release_lease()
    finally:
        await first.close()
    second = client(fleet, address)
    try:
        await second.lease("second", "test", 30)
        shown = await run(
            second, "import os\nprint('kept' in globals(), 'context' in globals(), os.listdir('.'))"
        )
        assert shown == "False False []\n"
        await second.release_lease()
    finally:
        await second.close()


async def test_a_lease_that_is_not_renewed_expires(fleet: Fleet) -> None:
    address = fleet.addresses[2]
    vanished = client(fleet, address)
    await vanished.lease("gone", "test", 1.5)
    await vanished.close()  # its orchestrator "vanishes": no renewal
    watcher = client(fleet, address)
    try:
        deadline = time.monotonic() + 15
        while (await watcher.info()).leased and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert not (await watcher.info()).leased
    finally:
        await watcher.close()


async def test_sessions_spread_over_the_fleet(fleet: Fleet) -> None:
    provider = FleetProvider(FleetConfig.model_validate(fleet.options()))
    try:
        sandboxes = [await provider.acquire(SandboxSpec(session_id=f"s{n}")) for n in range(3)]
        assert len({s.provider_state for s in sandboxes}) == 3
        with pytest.raises(SandboxError, match="no fleet agent could be leased"):
            await provider.acquire(SandboxSpec(session_id="one too many"))
        for sandbox in sandboxes:
            await provider.release(sandbox)
    finally:
        await provider.aclose()


def test_rlm_completions_run_on_the_fleet_concurrently(
    fleet: Fleet, make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule

    def reply(request: RecordedRequest) -> str:
        if len(request.messages) == 3:
            return repl(
                "import os\nseen = sorted(os.listdir('.'))\n"
                "open(context, 'w').write(context)\nanswer = [context, seen]"
            )
        return "FINAL_VAR(answer)"

    lm.add_rule(Rule(reply, model=ROOT_MODEL))

    def one(n: int) -> str:
        rlm = make_rlm(environment="fleet", environment_kwargs=fleet.options())
        return rlm.completion(f"file{n}").response

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(one, range(6)))
    # Each session saw an empty work dir: never another session's file.
    assert answers == [f"['file{n}', []]" for n in range(6)]


def test_an_agent_lost_mid_session_moves_the_session_to_another(
    fleet: Fleet, make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    kill_my_agent = "import os, signal\nkept = 1\nos.kill(os.getppid(), signal.SIGKILL)"
    rlm = make_rlm(
        root=[repl(kill_my_agent), repl("print('kept' in globals(), context)"), "FINAL(moved)"],
        environment="fleet",
        environment_kwargs=fleet.options(),
    )
    assert rlm.completion("the context").response == "moved"
    shown = str(lm.requests_for(ROOT_MODEL)[1].messages)
    assert "SandboxError" in shown and "moved to a new sandbox" in shown
    assert "lost its sandbox twice" in shown
    assert "False the context" in str(lm.requests_for(ROOT_MODEL)[2].messages)
    # The block ran again after the first loss (a lost sandbox is rebuilt by replay, and its
    # block run again), killed that agent too, and was not run a third time.
    assert sum(p.poll() is not None for p in fleet.processes) == 2


async def test_an_unreachable_agent_is_set_aside_until_it_comes_back(
    fleet: Fleet, tmp_path: Path
) -> None:
    set_aside = 6.0  # covers the failed attempt, the agent's restart and 3 leases
    options = fleet.options(unhealthy_seconds=set_aside, connect_timeout_seconds=1.0)
    provider = FleetProvider(FleetConfig.model_validate(options))
    dead = fleet.addresses[0]
    fleet.processes[0].kill()
    fleet.processes[0].wait()

    async def lease_each_turn() -> list[str]:
        """One lease and release per starting point of the rotation: every agent is first once."""
        leased = []
        for n in range(len(fleet.addresses)):
            sandbox = await provider.acquire(SandboxSpec(session_id=f"s{n}"))
            leased.append(sandbox.provider_state)
            await provider.release(sandbox)
        return leased

    try:
        tried = time.monotonic()  # it is set aside from a moment after this until + set_aside
        assert dead not in await lease_each_turn()  # the first turn tried it: set aside
        assert provider.is_unhealthy(dead)
        # Back on its address, it is still set aside: nobody else is leased it meanwhile.
        port = dead.rsplit(":", 1)[1]
        restarted, address = start_agent(tmp_path / "a0-again", fleet.pki, f"127.0.0.1:{port}")
        fleet.processes.append(restarted)
        assert address == dead
        while_aside = await lease_each_turn()
        assert time.monotonic() - tried < set_aside, "too slow to test the set-aside window"
        assert dead not in while_aside, "a set-aside agent was leased again"
        deadline = time.monotonic() + set_aside + 5
        while provider.is_unhealthy(dead) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert dead in await lease_each_turn(), "the agent was not leased again after its set-aside"
    finally:
        await provider.aclose()
