"""Local sandboxes forked from a template (the default start method) keep every property of a
spawned one: their own process groups, the jail, death with the orchestrator, no secret in a
worker, no descriptor of the template's, cleanup; and the warm pool hands them out started.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import psutil
import pytest

from rlm_orchestrator.config.backends import LocalConfig
from rlm_orchestrator.sandbox import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.local import LocalProvider
from sandbox_agent.forkserver import AGENT_TEMPLATE_NAME, WORKER_TEMPLATE_NAME
from tests.hostile_support import until
from tests.test_agent import run

SPEC = SandboxSpec(session_id="fork", exec_timeout_seconds=1.0)


@pytest.fixture
async def provider() -> AsyncIterator[LocalProvider]:
    local = LocalProvider()
    try:
        yield local
    finally:
        await local.aclose()


def _family(sandbox: Sandbox) -> dict[str, list[psutil.Process]]:
    """The sandbox's processes by name: rlm-agent, rlm-worker-tpl, rlm-worker (and the
    jail's init and worker, which keep the worker's name)."""
    agent = psutil.Process(sandbox.provider_state.process.pid)
    family: dict[str, list[psutil.Process]] = {}
    for process in [agent, *agent.children(recursive=True)]:
        family.setdefault(process.name(), []).append(process)
    return family


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of process `pid` contains `needle` (needs root)."""
    chunk = 16 << 20
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as memory:
        for line in maps:
            span, permissions, *_ = line.split()
            if not permissions.startswith("r") or line.rstrip().endswith("[vvar]"):
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            for offset in range(start, end, chunk):
                try:
                    memory.seek(offset)
                    data = memory.read(min(chunk + len(needle), end - offset))
                except OSError:
                    break
                if needle in data:
                    return True
    return False


async def test_a_forked_sandbox_has_its_own_groups_names_and_jail(provider: LocalProvider) -> None:
    sandbox = await provider.acquire(SPEC)
    family = _family(sandbox)
    (agent,) = family["rlm-agent"]
    (template,) = family[WORKER_TEMPLATE_NAME]
    assert os.getpgid(agent.pid) == agent.pid  # a session and group of its own
    assert template.ppid() == agent.pid and os.getpgid(template.pid) == agent.pid
    worker_pid = sandbox.provider_state.worker_pid
    assert os.getpgid(worker_pid) == worker_pid  # the worker leads its own group
    assert psutil.Process(worker_pid).ppid() == template.pid
    assert agent.ppid() == provider._template._process.pid  # type: ignore[union-attr]
    isolation = sandbox.provider_state.isolation
    assert isolation == "namespaces" or isolation.startswith("none:")
    report = await run(sandbox, "x = 1\nprint(x)")
    assert (report.status, report.stdout) == ("ok", "1\n")


async def test_a_worker_keeps_no_descriptor_of_its_templates(provider: LocalProvider) -> None:
    # The templates' sockets would let user code start processes outside its jail, the
    # orchestrator's pidfd would let it signal the orchestrator.
    sandbox = await provider.acquire(SPEC)
    code = (
        "import os\n"
        "print(sorted(os.readlink('/proc/self/fd/' + fd) for fd in os.listdir('/proc/self/fd')"
        " if os.path.exists('/proc/self/fd/' + fd)))"
    )
    report = await run(sandbox, code)
    assert report.status == "ok", report
    targets = eval(report.stdout)
    assert not [t for t in targets if t.startswith("socket:") or "pidfd" in t], targets


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
async def test_no_worker_or_template_ever_held_the_agents_token(provider: LocalProvider) -> None:
    # The worker template is forked before the agent reads its token: no worker's memory has
    # a copy of it. (The agent's own memory has: the search works.)
    sandbox = await provider.acquire(SPEC)
    await run(sandbox, "x = 1")
    token = sandbox.provider_state.token.encode()
    family = _family(sandbox)
    assert _memory_holds(family["rlm-agent"][0].pid, token)
    others = [p for name, group in family.items() if name != "rlm-agent" for p in group]
    assert others, family
    for process in others:
        assert not _memory_holds(process.pid, token), process


async def test_replacement_workers_are_forked_too(provider: LocalProvider) -> None:
    sandbox = await provider.acquire(SPEC)
    (template,) = _family(sandbox)[WORKER_TEMPLATE_NAME]
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    report = await run(sandbox, code, timeout_seconds=0.3)
    assert report.status == "timeout" and report.worker_restarted
    info = await sandbox.client.info()
    assert info.worker_pid != sandbox.provider_state.worker_pid
    assert psutil.Process(info.worker_pid).ppid() == template.pid
    assert (await run(sandbox, "print('again')")).stdout == "again\n"


async def test_random_is_seeded_per_sandbox(provider: LocalProvider) -> None:
    first, second = await asyncio.gather(provider.acquire(SPEC), provider.acquire(SPEC))
    code = "import random\nprint(random.getrandbits(64))"
    one, other = await asyncio.gather(run(first, code), run(second, code))
    assert one.status == other.status == "ok"
    assert one.stdout != other.stdout


async def test_a_killed_template_is_replaced(provider: LocalProvider) -> None:
    first = await provider.acquire(SPEC)
    agent_template = psutil.Process(psutil.Process(first.provider_state.process.pid).ppid())
    assert agent_template.name() == AGENT_TEMPLATE_NAME
    (worker_template,) = _family(first)[WORKER_TEMPLATE_NAME]
    agent_template.kill()
    worker_template.kill()
    # A new agent template for the next sandbox; the first one's agent spawns its workers.
    second = await provider.acquire(SPEC)
    assert psutil.Process(second.provider_state.process.pid).ppid() != agent_template.pid
    report = await run(first, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert report.worker_restarted
    for sandbox in (first, second):
        assert (await run(sandbox, "print(2)")).stdout == "2\n"


async def test_the_spawn_start_method_still_starts_fresh_processes() -> None:
    provider = LocalProvider(LocalConfig(start_method="spawn"))
    try:
        sandbox = await provider.acquire(SPEC)
        agent = psutil.Process(sandbox.provider_state.process.pid)
        assert agent.ppid() == os.getpid() and "-m sandbox_agent" in " ".join(agent.cmdline())
        assert (await run(sandbox, "print(3)")).stdout == "3\n"
    finally:
        await provider.aclose()


async def test_the_warm_pool_hands_out_started_sandboxes_and_refills() -> None:
    provider = LocalProvider(LocalConfig(warm_pool_size=2))
    pool = provider._pool
    try:
        await provider.warm_up()
        assert len(pool) == 2
        sandbox = await provider.acquire(SPEC)
        assert (pool.hits, pool.misses, sandbox.spec) == (1, 0, SPEC)
        assert (await run(sandbox, "print(4)")).stdout == "4\n"
        await until(lambda: len(pool) == 2)
        # Another memory limit than the pool's sandboxes were started with: started cold.
        other = await provider.acquire(SPEC.model_copy(update={"memory_limit_mb": 300}))
        assert pool.misses == 1 and other.provider_state.memory_limit_mb == 300
        # A pooled sandbox whose agent died is not handed out.
        for idle in pool._idle:
            os.kill(idle.sandbox.provider_state.process.pid, signal.SIGKILL)
        for idle in pool._idle:
            await idle.sandbox.provider_state.process.wait()
        third = await provider.acquire(SPEC)
        assert (await run(third, "print(5)")).stdout == "5\n"
    finally:
        await provider.aclose()
    assert len(pool) == 0
