"""Hostile sandboxes (issue 13, finding 6): the Docker socket directory and orphaned
containers. Index of the hostile tests: test_hostile.py."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import docker
import pytest
from conftest import (
    SANDBOX_IMAGE,
    _our_containers,
    backend_kwargs,
    repl,
    require_docker,
)
from hostile_support import (
    REPO,
    run_block,
)

from rlm_orchestrator import RLM
from rlm_orchestrator.config import DockerConfig
from rlm_orchestrator.sandbox import (
    SandboxSpec,
)
from rlm_orchestrator.sandbox.docker import DockerProvider
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

# -- finding 6: the Docker socket directory and orphaned containers ---------------------------

# Sandbox code that tries to use the bind-mounted socket directory: to fill the host's disk
# outside the container's tmpfs cap, and to remove its own agent's socket.
SOCKET_DIR_ATTACK = textwrap.dedent("""
    import json, os
    tried = {}
    try:
        with open('/sock/flood', 'wb') as f:
            for _ in range(64):
                f.write(b'x' * (1 << 20))
        tried['write'] = 'written'
    except OSError as exc:
        tried['write'] = type(exc).__name__
    try:
        os.unlink('/sock/agent.sock')
        tried['unlink'] = 'removed'
    except OSError as exc:
        tried['unlink'] = type(exc).__name__
    print(json.dumps(tried))
""")

# The same attack driven by an orchestrator running as a non-root user (a member of the
# docker group), as a script: the test runs it with setpriv.
NON_ROOT_ORCHESTRATOR = textwrap.dedent("""
    import asyncio, json, os, sys
    from pathlib import Path
    from rlm_orchestrator.sandbox import SandboxSpec, SubCallOutcome
    from rlm_orchestrator.config import DockerConfig
    from rlm_orchestrator.sandbox.docker import DockerProvider

    async def ignore(stream, text):
        return None

    async def no_calls(prompts, model, kind):
        return [SubCallOutcome(error="none") for _ in prompts]

    async def main():
        provider = DockerProvider(DockerConfig(image=sys.argv[1]))
        box = await provider.acquire(SandboxSpec(session_id="non-root"))
        try:
            sock_dir = box.provider_state.root / "sock"
            attack = await box.client.execute(
                sys.argv[2], on_output=ignore, on_sub_call=no_calls
            )
            after = await box.client.execute(
                "print(6 * 7)", on_output=ignore, on_sub_call=no_calls
            )
            stat = sock_dir.stat()
            print(json.dumps({
                "uid": os.geteuid(),
                "attack": attack.stdout,
                "after": after.stdout,
                "dir_mode": oct(stat.st_mode & 0o777),
                "dir_owner": stat.st_uid,
                "dir_files": sorted(p.name for p in sock_dir.iterdir()),
            }))
        finally:
            await provider.release(box)
            await provider.aclose()

    asyncio.run(main())
""")
NON_ROOT_UID = 4242


def _check_socket_dir_attack(attack_stdout: str, after_stdout: str) -> None:
    tried = json.loads(attack_stdout.strip().splitlines()[-1])
    assert tried == {"write": "PermissionError", "unlink": "PermissionError"}
    assert after_stdout.strip() == "42"  # the agent's socket is intact: it still answers


@pytest.mark.docker
async def test_docker_socket_dir_is_locked_after_the_agent_binds() -> None:
    require_docker()
    provider = DockerProvider(DockerConfig(image=SANDBOX_IMAGE))
    try:
        box = await provider.acquire(SandboxSpec(session_id="socket-dir-attack"))
        try:
            sock_dir = box.provider_state.root / "sock"
            attack = await run_block(box, SOCKET_DIR_ATTACK)
            after = await run_block(box, "print(6 * 7)")
            _check_socket_dir_attack(attack.stdout, after.stdout)
            assert sorted(p.name for p in sock_dir.iterdir()) == ["agent.sock"]
            assert sock_dir.stat().st_uid == os.geteuid()
            assert sock_dir.stat().st_mode & 0o777 == 0o755
        finally:
            await provider.release(box)
    finally:
        await provider.aclose()


def _non_root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start an orchestrator as another user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    # Our interpreter may live under /root (0700): run the venv's packages with the system's
    # CPython of the same minor version instead.
    system_python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system_python.exists():
        return f"{system_python} is missing"
    try:
        grp.getgrnam("docker")
    except KeyError:
        return "no docker group to give the non-root orchestrator access to the engine"
    return None


@pytest.mark.docker
def test_docker_socket_dir_is_locked_for_a_non_root_orchestrator() -> None:
    require_docker()
    problem = _non_root_problem()
    if problem is not None:
        pytest.skip(problem)
    home = Path(tempfile.mkdtemp(prefix="non-root-orchestrator-", dir="/tmp"))
    os.chown(home, NON_ROOT_UID, NON_ROOT_UID)
    site_packages = sysconfig.get_paths()["purelib"]
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONPATH": f"{REPO}:{site_packages}",
        "RLM_SANDBOX_OWNER": os.environ["RLM_SANDBOX_OWNER"],
    }
    command = [
        "setpriv",
        f"--reuid={NON_ROOT_UID}",
        f"--regid={NON_ROOT_UID}",
        f"--groups={grp.getgrnam('docker').gr_gid}",
        f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",
        "-c",
        NON_ROOT_ORCHESTRATOR,
        SANDBOX_IMAGE,
        SOCKET_DIR_ATTACK,
    ]
    try:
        done = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen["uid"] == NON_ROOT_UID
        _check_socket_dir_attack(seen["attack"], seen["after"])
        assert seen["dir_files"] == ["agent.sock"]
        assert (seen["dir_owner"], seen["dir_mode"]) == (NON_ROOT_UID, "0o755")
        assert list(home.iterdir()) == []  # its sandbox dir went with the release
    finally:
        shutil.rmtree(home, ignore_errors=True)


ORPHANED_ORCHESTRATOR = textwrap.dedent("""
    import asyncio, sys
    from rlm_orchestrator.sandbox import SandboxSpec
    from rlm_orchestrator.config import DockerConfig
    from rlm_orchestrator.sandbox.docker import DockerProvider

    async def main():
        options = DockerConfig(image=sys.argv[1], orphan_timeout_seconds=float(sys.argv[2]))
        box = await DockerProvider(options).acquire(SandboxSpec(session_id="orphan"))
        print(box.provider_state.container.id, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


@pytest.mark.docker
def test_an_orphaned_docker_sandbox_stops_by_itself() -> None:
    require_docker()
    before = _our_containers()
    owner = subprocess.Popen(
        [sys.executable, "-c", ORPHANED_ORCHESTRATOR, SANDBOX_IMAGE, "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    client = docker.from_env()
    try:
        assert owner.stdout is not None
        container_id = owner.stdout.readline().strip()
        assert container_id, "the orchestrator did not start a sandbox"
        container = client.containers.get(container_id)
        assert container.status == "running"
        owner.send_signal(signal.SIGKILL)  # no clean-up of any kind runs
        owner.wait()
        # Its agent notices the Attach stream is gone and stops: the container exits (the
        # deadline is only a bound for a broken build, not the behaviour under test).
        deadline = time.monotonic() + 60
        while container.status == "running" and time.monotonic() < deadline:
            time.sleep(0.25)
            container.reload()
        assert container.status == "exited", "the orphaned sandbox is still running"
        logs = container.logs().decode(errors="replace")
        assert "orphaned sandbox" in logs
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout:
            owner.stdout.close()
        client.close()
    # What is left (a stopped container, its socket dir) goes with the next reconcile.
    assert asyncio.run(DockerProvider(DockerConfig(image=SANDBOX_IMAGE)).reconcile()) >= 1
    assert not (_our_containers() - before)


@pytest.mark.docker
def test_an_idle_persistent_session_keeps_its_docker_sandbox(lm: ScriptedLMServer) -> None:
    """The other side of the orphan timeout: an orchestrator that is alive but idle (no event
    loop running between two completions) must not lose its sandbox."""
    require_docker()
    lm.set_sequence("root", [repl("kept = 6 * 7"), "FINAL(set)", repl("print(kept)"), "FINAL(ok)"])
    rlm = RLM(
        backend="openai",
        backend_kwargs=backend_kwargs(lm, "root"),
        environment="docker",
        environment_kwargs={"image": SANDBOX_IMAGE, "orphan_timeout_seconds": 1},
        persistent=True,
    )
    with rlm:
        assert rlm.completion("ctx").response == "set"
        time.sleep(4)  # four orphan timeouts with nothing running in this process
        assert rlm.completion("ctx").response == "ok"
    shown = "\n".join(str(m["content"]) for m in lm.requests_for("root")[-1].messages)
    assert "42" in shown
    assert "restarted" not in shown and "new sandbox" not in shown
