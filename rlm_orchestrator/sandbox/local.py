"""Local sandboxes: one agent process per session, on a unix socket in a private temp dir.

The embedded default. No isolation beyond a separate process (and optional memory limit):
use it for development and trusted code. What it guarantees is that nothing is left
behind: the agent, its worker, their children, the socket and the temp dir all go at
release, on errors and on cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from rlm_orchestrator.exceptions import SandboxError
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.base import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.owner import orchestrator_id, owner_gone

TEMP_PREFIX = "rlm-sbx-"
# The only variables a sandbox inherits: nothing that could carry a secret.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "SYSTEMROOT")
STOP_GRACE_SECONDS = 3.0
OWNER_ENV = "RLM_SANDBOX_OWNER"
OWNER_FILE = "owner"


class LocalOptions(BaseModel):
    """environment_kwargs understood by the local provider."""

    model_config = ConfigDict(extra="ignore")

    python: str = sys.executable
    temp_dir: str | None = None


@dataclass
class _LocalState:
    root: Path
    process: asyncio.subprocess.Process
    worker_pid: int = 0


def sandbox_environment(root: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update(HOME=str(root / "work"), TMPDIR=str(root / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    # A label (not a secret) that tells whose sandbox a process is, to find strays.
    env[OWNER_ENV] = os.environ.get(OWNER_ENV) or f"orchestrator-{os.getpid()}"
    return env


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _kill_group(pid: int) -> None:
    if pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


class LocalProvider:
    """Starts `python -m sandbox_agent` per sandbox."""

    name = "local"

    def __init__(self, options: LocalOptions | None = None) -> None:
        self.options = options or LocalOptions()
        self._live: dict[str, Sandbox] = {}
        self._reconciled = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LocalProvider:
        return cls(LocalOptions.model_validate(options))

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
        if not self._reconciled:
            self._reconciled = True
            await self.reconcile()
        root = Path(
            await asyncio.to_thread(tempfile.mkdtemp, prefix=TEMP_PREFIX, dir=self.options.temp_dir)
        )
        await asyncio.to_thread((root / OWNER_FILE).write_text, orchestrator_id())
        (root / "tmp").mkdir()
        socket_path = root / "agent.sock"
        log_path = root / "agent.log"
        process: asyncio.subprocess.Process | None = None
        client: AgentClient | None = None
        try:
            with await asyncio.to_thread(open, log_path, "wb") as log:
                process = await asyncio.create_subprocess_exec(
                    self.options.python,
                    "-m",
                    "sandbox_agent",
                    "--listen",
                    f"unix:{socket_path}",
                    "--workdir",
                    str(root / "work"),
                    "--state-dir",
                    str(root / "state"),
                    "--exec-timeout",
                    str(spec.exec_timeout_seconds),
                    "--max-output-chars",
                    str(spec.max_output_chars),
                    "--memory-limit-mb",
                    str(spec.memory_limit_mb),
                    "--parent-pid",
                    str(os.getpid()),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    env=sandbox_environment(root),
                    cwd=root,
                    start_new_session=True,
                )
            state = _LocalState(root, process)
            await self._wait_listening(process, log_path, spec.startup_timeout_seconds)
            client = AgentClient(f"unix:{socket_path}")
            await client.wait_ready(spec.startup_timeout_seconds)
            state.worker_pid = (await client.info()).worker_pid
        except BaseException:
            # Failed or cancelled start: leave nothing behind.
            if client is not None:
                await client.close()
            await self._stop(process, 0, root)
            raise
        sandbox = Sandbox(f"local-{uuid.uuid4().hex[:12]}", client, spec, state)
        self._live[sandbox.sandbox_id] = sandbox
        return sandbox

    @staticmethod
    async def _wait_listening(
        process: asyncio.subprocess.Process, log_path: Path, timeout: float
    ) -> None:
        """The agent prints LISTENING once its worker is up and its socket is bound."""
        assert process.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await process.stdout.readline()
        except TimeoutError:
            line = b""
        if not line.startswith(b"LISTENING"):
            await asyncio.sleep(0.1)  # let the agent finish writing its error
            log_tail = await asyncio.to_thread(_tail, log_path)
            raise SandboxError(
                f"the local sandbox agent did not start within {timeout:g}s "
                f"(exit code {process.returncode}); its log ends with:\n{log_tail}"
            )

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
    async def _stop(
        process: asyncio.subprocess.Process | None, worker_pid: int, root: Path
    ) -> None:
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
        for sandbox in list(self._live.values()):
            await self.release(sandbox)
