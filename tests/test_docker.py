"""Docker sandboxes on this machine's real engine: lockdown, limits, reconcile, warm pool.

The semantics suite also runs in containers (the [docker] variants of test_semantics*.py).
These tests skip when the engine or the image is missing; in CI (or with RLM_REQUIRE_DOCKER=1)
they fail.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from conftest import (
    ROOT_MODEL,
    SANDBOX_IMAGE,
    SERVER_TOKEN,
    _our_containers,
    repl,
    require_docker,
    server_config,
)

import rlm_wire
from rlm_orchestrator import RLM, SandboxError
from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.config import DockerConfig
from rlm_orchestrator.sandbox import Sandbox, SandboxSpec, SubCallOutcome
from rlm_orchestrator.sandbox.agent_client import ExecutionReport
from rlm_orchestrator.sandbox.docker import DockerProvider
from rlm_orchestrator.service.server import OrchestratorServer
from rlm_orchestrator.service.settings import load_server_settings
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def docker_required() -> None:
    require_docker()


@pytest.fixture
async def provider() -> AsyncIterator[DockerProvider]:
    docker_provider = DockerProvider(
        DockerConfig(image=SANDBOX_IMAGE, memory_mb=256, pids_limit=64)
    )
    try:
        yield docker_provider
    finally:
        await docker_provider.aclose()


@pytest.fixture
async def sandbox(provider: DockerProvider) -> AsyncIterator[Sandbox]:
    box = await provider.acquire(SandboxSpec(session_id="docker-test", exec_timeout_seconds=10))
    try:
        yield box
    finally:
        await provider.release(box)


async def run(box: Sandbox, code: str) -> ExecutionReport:
    async def ignore(stream: str, text: str) -> None:
        return None

    async def answer(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        return [SubCallOutcome(text=f"answer to {p}") for p in prompts]

    return await box.client.execute(code, on_output=ignore, on_sub_call=answer)


async def test_no_network_at_all(sandbox: Sandbox, lm: ScriptedLMServer) -> None:
    code = textwrap.dedent(f"""
        import socket
        for host, port in [("172.17.0.1", {lm.port}), ("127.0.0.1", {lm.port}),
                           ("8.8.8.8", 53), ("1.1.1.1", 443)]:
            try:
                socket.create_connection((host, port), timeout=2).close()
                print("CONNECTED", host)
            except OSError as exc:
                print("refused", host, type(exc).__name__)
    """)
    report = await run(sandbox, code)
    assert "CONNECTED" not in report.stdout
    assert report.stdout.count("refused") == 4
    # llm_query still works: it rides the orchestrator's stream, not the network.
    assert (await run(sandbox, "print(llm_query('hi'))")).stdout == "answer to hi\n"


async def test_writes_outside_the_work_dir_fail(sandbox: Sandbox) -> None:
    code = textwrap.dedent("""
        import os
        for path in ["/etc/evil", "/tmp/evil", "/usr/evil", "/sock/evil", "/evil"]:
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as exc:
                print("denied", path)
        open("notes.txt", "w").write("fine here")
        print(os.getcwd(), open("notes.txt").read())
    """)
    report = await run(sandbox, code)
    assert "WROTE" not in report.stdout, report.stdout
    assert "/work/code fine here" in report.stdout


async def test_environment_has_no_secrets_and_runs_as_nobody(sandbox: Sandbox) -> None:
    report = await run(sandbox, "import os, json\nprint(json.dumps(dict(os.environ)), os.getuid())")
    assert "sk-orchestrator-secret" not in report.stdout and "API_KEY" not in report.stdout
    assert report.stdout.strip().endswith(" 65534")


async def test_fork_bomb_and_huge_allocation_are_stopped_and_reported(sandbox: Sandbox) -> None:
    bomb = await run(sandbox, "import os\nwhile True:\n    os.fork()")
    assert bomb.status in ("error", "worker_died")
    assert (
        "BlockingIOError" in bomb.stderr
        or "Resource temporarily unavailable" in bomb.stderr
        or bomb.worker_restarted
    )
    allocation = await run(sandbox, "blob = bytearray(10 * 1024**3)")
    assert allocation.status in ("error", "worker_died")
    assert "MemoryError" in allocation.stderr or allocation.worker_restarted
    assert (await run(sandbox, "print('still going')")).stdout == "still going\n"


async def test_the_image_carries_the_agent_and_only_its_part_of_the_wire(sandbox: Sandbox) -> None:
    listing = textwrap.dedent("""
        import os
        lib = '/opt/rlm/lib'
        print(sorted(os.listdir(lib)))
        for root, _, files in os.walk(f'{lib}/rlm_wire'):
            for name in files:
                if name.endswith('.py'):
                    print(os.path.relpath(os.path.join(root, name), f'{lib}/rlm_wire'))
    """)
    first, *wire = (await run(sandbox, listing)).stdout.splitlines()
    assert sorted(wire) == sorted(rlm_wire.AGENT_FILES)  # not the orchestrator's generated code
    for absent in ("rlm_orchestrator", "pydantic", "litellm"):
        assert absent not in first


def test_reconcile_removes_the_containers_of_a_killed_orchestrator() -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        from rlm_orchestrator.sandbox import SandboxSpec
        from rlm_orchestrator.config import DockerConfig
        from rlm_orchestrator.sandbox.docker import DockerProvider
        async def main():
            provider = DockerProvider(DockerConfig(image={SANDBOX_IMAGE!r}))
            await provider.acquire(SandboxSpec(session_id="doomed"))
            print("ACQUIRED", flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
    """)
    before = _our_containers()
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert doomed.stdout is not None and doomed.stdout.readline().startswith("ACQUIRED")
        orphans = _our_containers() - before
        assert len(orphans) == 1
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        if doomed.stdout:
            doomed.stdout.close()
    assert _our_containers() - before == orphans  # nothing removed it: its owner died hard
    # A new orchestrator's reconcile pass finds the orphan (its owner's pid is gone).
    assert asyncio.run(DockerProvider(DockerConfig(image=SANDBOX_IMAGE)).reconcile()) >= 1
    assert not (_our_containers() & orphans)


async def test_warm_pool_acquire_starts_no_container() -> None:
    provider = DockerProvider(DockerConfig(image=SANDBOX_IMAGE, warm_pool_size=1))
    try:
        await provider.warm_up()
        pooled = _our_containers()
        assert len(pooled) == 1
        box = await provider.acquire(SandboxSpec(session_id="warm"))
        try:
            info = await box.client.info()
            assert info.agent_pid > 0
            (taken,) = pooled
            assert box.sandbox_id == f"docker-{taken[:12]}"  # the pooled container itself
            assert (await run(box, "print(6 * 7)")).stdout == "42\n"
        finally:
            await provider.release(box)
    finally:
        await provider.aclose()


def test_rlm_runs_in_docker_and_cleans_up(
    make_rlm: Callable[..., RLM], lm: ScriptedLMServer
) -> None:
    rlm = make_rlm(
        root=[repl("import os\nprint(os.getuid(), len(context))"), "FINAL(done)"],
        environment="docker",
        environment_kwargs={"image": SANDBOX_IMAGE},
    )
    assert rlm.completion("12345").response == "done"
    assert "65534 5" in str(lm.requests_for(ROOT_MODEL)[1].messages)


async def test_a_failed_start_is_a_clear_error_and_leaves_nothing() -> None:
    provider = DockerProvider(DockerConfig(image="rlm-sandbox:no-such-tag"))
    try:
        with pytest.raises(SandboxError, match="could not start a sandbox container"):
            await provider.acquire(SandboxSpec(session_id="broken"))
    finally:
        await provider.aclose()


async def test_the_server_runs_completions_in_docker_sandboxes(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    config = server_config(lm, tmp_path, environment="docker")
    with config.open("a") as toml:
        toml.write(f'[environment_kwargs]\nimage = "{SANDBOX_IMAGE}"\n')
    server = OrchestratorServer(load_server_settings(config))
    port = await server.start()
    try:
        lm.set_sequence(
            ROOT_MODEL, [repl("import os\nprint(os.getuid())"), "FINAL(in a container)"]
        )
        async with AsyncClient(f"127.0.0.1:{port}", token=SERVER_TOKEN) as client:
            assert (await client.completion("ctx")).response == "in a container"
        assert "65534" in str(lm.requests_for(ROOT_MODEL)[1].messages)
    finally:
        await server.stop()
