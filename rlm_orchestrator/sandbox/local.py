"""Local sandboxes: one agent process per session, on a unix socket in a private temp dir.

The embedded default. The agent runs as the orchestrator's user, outside any jail (it
enforces the limits); its worker, where user code runs, is jailed (`sandbox_agent/jail.py`):
its own user, pid, mount, network, IPC and UTS namespaces, a read-only view of the system with
only its work dir writable, no network, no view of other processes, process / memory / file
limits. Where the kernel refuses namespaces, `isolation="auto"` runs the worker without them
and says so on every acquire; `"required"` refuses to start. The agent's socket is 0600 in a
0700 directory and every call carries a per-sandbox token.

Nothing is left behind: the agent, its worker, their children, the socket and the temp dir
all go at release, on errors and on cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from rlm_orchestrator.config.backends import LOCAL_MEMORY_LIMIT_MB, LocalConfig
from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.launch import AgentLaunch
from rlm_orchestrator.sandbox.local_template import AgentTemplate
from rlm_orchestrator.sandbox.owner import orchestrator_id, owner_gone
from rlm_orchestrator.sandbox.warm_pool import WarmPool
from sandbox_agent.template_client import FD_PLACEHOLDER, STDIO_NULL, ForkedProcess

log = logging.getLogger("rlm_orchestrator.sandbox.local")
AgentProcess = asyncio.subprocess.Process | ForkedProcess

TEMP_PREFIX = "rlm-sbx-"
ISOLATED = "namespaces"  # what a jailed agent reports (GetInfo.isolation)
# The only variables a sandbox inherits: nothing that could carry a secret.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "SYSTEMROOT")
STOP_GRACE_SECONDS = 3.0
OWNER_ENV = "RLM_SANDBOX_OWNER"
OWNER_FILE = "owner"


@dataclass
class _LocalState:
    root: Path
    process: AgentProcess
    worker_pid: int = 0
    isolation: str = "off"
    memory_limit_mb: int = 0  # the worker's, fixed at start (a pooled sandbox must match)
    token: str = field(default="", repr=False)  # every call to the agent carries it


def sandbox_environment(root: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update(HOME=str(root / "work"), TMPDIR=str(root / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    # A label (not a secret) that tells whose sandbox a process is, to find strays.
    env[OWNER_ENV] = os.environ.get(OWNER_ENV) or f"orchestrator-{os.getpid()}"
    return env


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _compile_agent() -> None:
    """Agents and workers run with PYTHONDONTWRITEBYTECODE (sandboxed code must not write into
    the venv): compile the agent's modules and the wire's once here, or every agent and worker
    compiles them (the jail's included) again at each start. Only stale files; nothing where
    read-only."""
    import compileall

    import rlm_wire
    import sandbox_agent

    for init in (sandbox_agent.__file__, rlm_wire.__file__):
        with contextlib.suppress(OSError):
            compileall.compile_dir(Path(init).parent, quiet=2)


def _token_pipe(token: str) -> int:
    """The read end of a pipe holding the token (for the agent's --token-fd)."""
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode())  # far below a pipe's buffer
    os.close(write_end)
    return read_end


def _agent_alive(sandbox: Sandbox) -> bool:
    process: AgentProcess = sandbox.provider_state.process
    if isinstance(process, ForkedProcess):
        return not process.has_ended()
    return process.returncode is None


def _kill_group(pid: int) -> None:
    if pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


class LocalProvider:
    """Starts `python -m sandbox_agent` per sandbox."""

    name = "local"

    def __init__(self, options: LocalConfig | None = None) -> None:
        self.options = options or LocalConfig()
        self._live: dict[str, Sandbox] = {}
        self._reconciled = False
        self._template: AgentTemplate | None = None
        self._starts = 0  # sandbox starts in flight
        self._pool = WarmPool(
            self._start_sandbox,
            self.release,
            _agent_alive,
            self.options.warm_pool_size,
            self.options.warm_max_idle_seconds,
        )

    async def reconcile(self) -> int:
        """Remove the sandbox dirs of orchestrators that died (their agents stopped with them:
        `--parent-pid`); returns how many."""
        return await asyncio.to_thread(self._remove_orphan_dirs)

    def _remove_orphan_dirs(self) -> int:
        base = Path(self.options.temp_dir or tempfile.gettempdir())
        removed = 0
        for root in base.glob(f"{TEMP_PREFIX}*"):
            owner_file = root / OWNER_FILE
            if owner_file.is_file() and owner_gone(owner_file.read_text().strip()):
                shutil.rmtree(root, ignore_errors=True)
                removed += 1
        return removed

    async def acquire(self, spec: SandboxSpec) -> Sandbox:
        memory_limit_mb = spec.memory_limit_or(LOCAL_MEMORY_LIMIT_MB)

        def fits(sandbox: Sandbox) -> bool:
            state: _LocalState = sandbox.provider_state
            return state.memory_limit_mb == memory_limit_mb

        return self._pool.take(spec, fits) or await self._start_sandbox(spec)

    async def warm_up(self) -> None:
        """Fill the warm pool now (a no-op without one); it is kept full from then on."""
        await self._pool.fill()

    async def _start_sandbox(self, spec: SandboxSpec) -> Sandbox:
        if not self._reconciled:
            self._reconciled = True
            await self.reconcile()
            await asyncio.to_thread(_compile_agent)
        # No await between making the directory and the try below: a cancelled start (a warm
        # pool closing while it refills) must not leave it behind.
        root = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.options.temp_dir))
        socket_path = root / "agent.sock"
        log_path = root / "agent.log"
        token = secrets.token_urlsafe(32)
        process: AgentProcess | None = None
        client: AgentClient | None = None
        self._starts += 1
        try:
            (root / OWNER_FILE).write_text(orchestrator_id())
            (root / "tmp").mkdir()
            process, stdout = await self._start_agent(spec, root, socket_path, log_path, token)
            state = _LocalState(root, process, token=token)
            state.memory_limit_mb = spec.memory_limit_or(LOCAL_MEMORY_LIMIT_MB)
            listening = await self._wait_listening(
                process, stdout, log_path, spec.startup_timeout_seconds
            )
            # LISTENING comes once the worker is up and the server SERVING: no health check.
            state.worker_pid = int(listening.get("pid", "0"))
            state.isolation = listening.get("isolation", "unknown")
            self._check_isolation(state.isolation)
            from rlm_wire.auth import bearer_metadata

            client = AgentClient(f"unix:{socket_path}", metadata=bearer_metadata(token))
        except BaseException:
            # Failed or cancelled start: leave nothing behind (the template neither, when no
            # sandbox of this provider needs it).
            if client is not None:
                await client.close()
            await self._stop(process, 0, root)
            if self._starts == 1 and not self._live and self._template is not None:
                await self._template.aclose()
            raise
        finally:
            self._starts -= 1
        sandbox = Sandbox(f"local-{uuid.uuid4().hex[:12]}", client, spec, state)
        self._live[sandbox.sandbox_id] = sandbox
        return sandbox

    async def _start_agent(
        self, spec: SandboxSpec, root: Path, socket_path: Path, log_path: Path, token: str
    ) -> tuple[AgentProcess, asyncio.StreamReader]:
        """Fork the agent from the template (or spawn `python -m sandbox_agent`); its stdout
        is where it says LISTENING, its stderr the sandbox's log."""
        env = sandbox_environment(root)
        token_fd = _token_pipe(token)
        try:
            with await asyncio.to_thread(open, log_path, "wb") as agent_log:
                if self.options.start_method == "spawn":
                    process = await asyncio.create_subprocess_exec(
                        *self._agent_command(spec, root, socket_path, token_fd),
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=agent_log,
                        env=env,
                        cwd=root,
                        start_new_session=True,
                        pass_fds=(token_fd,),
                    )
                    assert process.stdout is not None
                    return process, process.stdout
                return await self._fork_agent(spec, root, socket_path, agent_log, token_fd, env)
        finally:
            os.close(token_fd)

    async def _fork_agent(
        self,
        spec: SandboxSpec,
        root: Path,
        socket_path: Path,
        agent_log: IO[bytes],
        token_fd: int,
        env: dict[str, str],
    ) -> tuple[AgentProcess, asyncio.StreamReader]:
        if self._template is None:
            # The template's own environment is a sandbox's, minus the sandbox's dirs.
            self._template = AgentTemplate(
                self.options.python, {**sandbox_environment(Path("/")), "MALLOC_ARENA_MAX": "1"}
            )
        # No --parent-pid: the template watches this process and its agents inherit that.
        launch = replace(self._agent_launch(spec, root, socket_path, None), parent_pid=None)
        args = [*launch.args(), "--token-fd", FD_PLACEHOLDER % 2]
        read_end, write_end = os.pipe()
        try:
            process = await self._template.start_agent(
                args,
                fds=(write_end, agent_log.fileno(), token_fd),
                stdio=(STDIO_NULL, 0, 1),
                cwd=str(root),
                env=env,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        loop = asyncio.get_running_loop()
        stdout = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(read_end, "rb", 0)
        )
        return process, stdout

    def _agent_command(
        self, spec: SandboxSpec, root: Path, socket_path: Path, token_fd: int
    ) -> list[str]:
        """`python -m sandbox_agent ...` (start_method="spawn")."""
        return self._agent_launch(spec, root, socket_path, token_fd).argv(self.options.python)

    def _agent_launch(
        self, spec: SandboxSpec, root: Path, socket_path: Path, token_fd: int | None
    ) -> AgentLaunch:
        o = self.options
        launch = AgentLaunch(
            listen=f"unix:{socket_path}",
            workdir=str(root / "work"),
            state_dir=str(root / "state"),
            isolation=o.isolation,
            max_processes=o.max_processes,
            tmp_size_mb=o.tmp_size_mb,
            sandbox_uid=o.sandbox_uid,
            # Only the orchestrator's user may connect (the directory is 0700 too), and each
            # call carries this sandbox's token, which came through a pipe, not the environment.
            socket_mode=0o600,
            token_fd=token_fd,
            parent_pid=os.getpid(),
        )
        return launch.for_session(spec, LOCAL_MEMORY_LIMIT_MB)

    def _check_isolation(self, isolation: str) -> None:
        if isolation == ISOLATED or self.options.isolation == "off":
            return
        problem = (
            f"local sandbox NOT isolated ({isolation}): its code runs with the orchestrator's "
            "user and can read its files and environment; enable unprivileged user namespaces, "
            'or use environment="docker"'
        )
        if self.options.isolation == "required":
            raise SandboxError(f"isolation='required' but {problem}")
        log.warning("%s (isolation='auto'; 'off' silences this)", problem)

    async def check_isolation(self) -> str:
        """What a sandbox would get here: "namespaces", "none: <why>", or "off" when switched
        off. Runs the jail once without an agent (`python -m sandbox_agent.jail`)."""
        if self.options.isolation == "off":
            return "off"
        root = Path(
            await asyncio.to_thread(tempfile.mkdtemp, prefix=TEMP_PREFIX, dir=self.options.temp_dir)
        )
        try:
            for name in ("work", "state"):
                (root / name).mkdir()
            probe = await asyncio.create_subprocess_exec(
                *(self.options.python, "-m", "sandbox_agent.jail"),
                *("--workdir", str(root / "work"), "--state-dir", str(root / "state")),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=sandbox_environment(root),
                cwd=root,
            )
            output, _ = await probe.communicate()
            lines = output.decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else f"none: the probe exited with code {probe.returncode}"
        finally:
            await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)

    @staticmethod
    async def _wait_listening(
        process: AgentProcess, stdout: asyncio.StreamReader, log_path: Path, timeout: float
    ) -> dict[str, str]:
        """The agent prints `LISTENING <address>` once its worker is up and its server SERVING,
        then `WORKER pid=<pid> isolation=<how>`; returns the second line's fields."""
        line = worker = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                line = await stdout.readline()
                worker = await stdout.readline()
        if not line.startswith(b"LISTENING"):
            with contextlib.suppress(TimeoutError):  # let the agent finish writing its error
                await asyncio.wait_for(process.wait(), 0.5)
            log_tail = await asyncio.to_thread(_tail, log_path)
            how = (
                f"did not start within {timeout:g}s"
                if process.returncode is None
                else f"exited at start (code {process.returncode})"
            )
            raise SandboxError(f"the local sandbox agent {how}; its log ends with:\n{log_tail}")
        # The isolation (last) may hold spaces: "none: <why>".
        fields = worker.decode(errors="replace").rstrip("\n").split(" ", 2)[1:]
        return {key: value for key, _, value in (field.partition("=") for field in fields)}

    async def release(self, sandbox: Sandbox) -> None:
        if self._live.pop(sandbox.sandbox_id, None) is None:
            return
        state: _LocalState = sandbox.provider_state
        with contextlib.suppress(Exception):
            # The worker may have been replaced since start: ask for the current one.
            state.worker_pid = (await asyncio.wait_for(sandbox.client.info(), 1.0)).worker_pid
        with contextlib.suppress(Exception):
            await sandbox.client.close()
        await self._stop(state.process, state.worker_pid, state.root)

    @staticmethod
    async def _stop(process: AgentProcess | None, worker_pid: int, root: Path) -> None:
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()  # the agent stops its worker's group on SIGTERM
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                _kill_group(process.pid)
                await process.wait()
        if process is not None:
            _kill_group(process.pid)
        # The worker leads its own group; if the agent could not stop it, we do.
        _kill_group(worker_pid)
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)

    async def aclose(self) -> None:
        await self._pool.aclose()
        for sandbox in list(self._live.values()):
            await self.release(sandbox)
        if self._template is not None:
            await self._template.aclose()
            self._template = None
