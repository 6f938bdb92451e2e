"""The agent's side of the worker: start it, run code in it, stop it, replace it.

Everything here is asyncio and never blocks the agent's event loop. The worker is a child
process in a process group of its own, so that stopping runaway code can take its children
with it. Frames from the worker are read by one task into a bounded inbox: waiting on it can
be cancelled or timed out without ever cutting a frame in half.

The worker runs hostile code, which can write frames of its own: every frame is checked
(`protocol.py`), output and sub-calls are counted by the agent itself (`ledger.py`), and a
worker that breaks the protocol is killed and replaced like one that died.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_agent import strays
from sandbox_agent.execution import (
    PROTOCOL_BROKEN,
    ExecutionOutcome,
    ExecutionSink,
    WorkerError,
    ask,
    describe_exit,
    follow,
    read_value,
    refusal,
    reply,
)
from sandbox_agent.frames import Kind, encode_json
from sandbox_agent.ledger import REFUSED_ENDED, ExecutionLedger
from sandbox_agent.limits import (
    DEFAULT_EXEC_TIMEOUT_SECONDS,
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_TMP_SIZE_MB,
    NOBODY_UID,
)
from sandbox_agent.protocol import (
    DoneFrame,
    VariableHeaderFrame,
    parse_loaded,
    parse_ready,
)
from sandbox_agent.template_client import TemplateClient
from sandbox_agent.worker_process import WorkerProcess, WorkerStarter

TIMEOUT, CANCELLED = "timeout", "cancelled"
__all__ = ["ExecutionOutcome", "ExecutionSink", "Executor", "ExecutorConfig", "WorkerError"]


@dataclass
class ExecutorConfig:
    workdir: Path
    # Loaded values (contexts, histories) are kept here, to load them again into a new worker.
    state_dir: Path
    # For an Execute call that sets no timeout or output cap (the orchestrator sets both).
    exec_timeout_seconds: float = DEFAULT_EXEC_TIMEOUT_SECONDS
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    memory_limit_mb: int = 0  # the worker's address space (RLIMIT_AS); 0: none
    # How long interrupted code gets to stop before its process group is killed.
    interrupt_grace_seconds: float = 2.0
    python: str = sys.executable
    # Local sandboxes only: the worker in a jail of namespaces (jail.py). "off"; "auto" (when
    # the kernel allows it, else the worker runs as without); "required" (else it fails).
    isolation: str = "off"
    max_processes: int = DEFAULT_MAX_PROCESSES  # in the jail (RLIMIT_NPROC of its user namespace)
    tmp_size_mb: int = DEFAULT_TMP_SIZE_MB  # the jail's /tmp
    sandbox_uid: int = NOBODY_UID  # who user code is outside the jail when the agent runs as root
    # Where workers are forked from (an agent forked by the local fork server has one):
    # milliseconds instead of a Python start-up, for the first worker and every replacement.
    worker_template: TemplateClient | None = None


@dataclass
class _LoadedValue:
    name: str
    alias: str
    encoding: str
    path: Path


class Executor:
    """Runs code blocks, one at a time, in a worker that it replaces when it dies."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.workers_started = 0
        self._worker: WorkerProcess | None = None
        self._lock = asyncio.Lock()
        self._loaded: dict[str, _LoadedValue] = {}
        self._interrupt_reason: str | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        # What the current worker got: "namespaces", "none: <why>" or "off" (from its READY).
        self.isolation = "off"
        # The running execution's accounting (output, sub-calls in flight).
        self._ledger: ExecutionLedger | None = None
        self._starter = WorkerStarter(
            config.python, config.workdir, self._worker_flags(), config.worker_template
        )

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def stopping(self) -> bool:
        """The running execution is being interrupted: the next one will start shortly."""
        return self._interrupt_reason is not None

    @property
    def worker_pid(self) -> int:
        return self._worker.pid if self._worker else 0

    @property
    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    async def start(self) -> None:
        strays.adopt_orphans()
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        await self._spawn()

    async def close(self) -> None:
        if self._kill_timer:
            self._kill_timer.cancel()
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await worker.close()

    async def _spawn(self) -> None:
        self._worker = await self._starter.start()
        self.workers_started += 1
        ready = await self._reply(self._worker, Kind.READY)
        self.isolation = str(ready.get("isolation", "off"))
        self._worker.jailed = self.isolation == "namespaces"

    def _worker_flags(self) -> list[str]:
        config = self.config
        flags = [
            *("--max-output-chars", str(config.max_output_chars)),
            *("--memory-limit-mb", str(config.memory_limit_mb)),
        ]
        if config.isolation == "off":
            return flags
        return [
            *flags,
            *("--isolation", config.isolation),
            *("--workdir", str(config.workdir), "--state-dir", str(config.state_dir)),
            *("--max-processes", str(config.max_processes)),
            *("--tmp-size-mb", str(config.tmp_size_mb)),
            *("--sandbox-uid", str(config.sandbox_uid)),
        ]

    async def _reply(self, worker: WorkerProcess, expected: int) -> dict[str, Any]:
        """The next frame of kind `expected`, as a JSON object."""
        return await reply(worker, worker.replies.expect(expected), parse_ready)

    async def _replace_worker(self) -> None:
        if self._worker is not None:
            await self._worker.close()
            self._worker = None
        await self._spawn()
        assert self._worker is not None
        for value in self._loaded.values():
            load = encode_json(Kind.LOAD, self._load_request(value))
            await ask(self._worker, load, Kind.LOADED, parse_loaded)

    @staticmethod
    def _load_request(value: _LoadedValue) -> dict[str, str]:
        return {
            "name": value.name,
            "alias": value.alias,
            "encoding": value.encoding,
            "path": str(value.path),
        }

    def interrupt(self, reason: str) -> None:
        """Stop the running code: SIGINT now, the whole process group after the grace."""
        worker = self._worker
        if worker is None or not self.busy or self._interrupt_reason is not None:
            return
        self._interrupt_reason = reason
        worker.signal(signal.SIGINT)
        self._kill_timer = asyncio.get_running_loop().call_later(
            self.config.interrupt_grace_seconds, worker.kill
        )

    def deliver_llm_response(self, request_id: int, results: Sequence[str]) -> None:
        ledger = self._ledger
        # Only answers to requests in flight reach the worker (not one for a refused request,
        # nor a late one for a worker that was replaced).
        if self._worker is not None and ledger is not None and ledger.answered(request_id):
            self._worker.send(
                encode_json(Kind.LLM_RESPONSE, {"id": request_id, "results": list(results)})
            )

    async def execute(
        self, code: str, sink: ExecutionSink, timeout_seconds: float = 0, max_output_chars: int = 0
    ) -> ExecutionOutcome:
        timeout = timeout_seconds or self.config.exec_timeout_seconds
        cap = max_output_chars or self.config.max_output_chars
        async with self._lock:
            if self._worker is None:
                await self._replace_worker()
            worker = self._worker
            assert worker is not None
            self._interrupt_reason = None
            self._ledger = ledger = ExecutionLedger(cap)
            started = asyncio.get_running_loop().time()
            worker.send(encode_json(Kind.EXECUTE, {"code": code, "max_output_chars": cap}))
            try:
                return await self._follow(worker, sink, started + timeout, timeout, ledger)
            finally:
                if self._kill_timer:
                    self._kill_timer.cancel()
                    self._kill_timer = None
                self._interrupt_reason = None
                self._ledger = None
                # Threads of the code still waiting for sub-calls get an answer: the stream
                # that would have carried theirs is gone.
                for request_id, count in ledger.unanswered():
                    worker.send(refusal(request_id, count, REFUSED_ENDED))

    async def _follow(
        self,
        worker: WorkerProcess,
        sink: ExecutionSink,
        deadline: float,
        timeout: float,
        ledger: ExecutionLedger,
    ) -> ExecutionOutcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # One timer per execution (not one per frame); gone before a new worker may start.
        timer = loop.call_at(deadline, self.interrupt, TIMEOUT)
        try:
            done = await follow(worker, sink, ledger)
        finally:
            timer.cancel()
        if done is None:
            return await self._worker_lost(worker, sink, timeout, loop.time() - started, ledger)
        return await self._finish(done, sink, timeout, ledger)

    def _interrupt_message(self, timeout: float, killed: bool) -> tuple[str, str]:
        how = "its process group was killed" if killed else "it was interrupted"
        if self._interrupt_reason == TIMEOUT:
            return TIMEOUT, f"TimeoutError: execution exceeded {timeout:g} seconds; {how}"
        return CANCELLED, f"CancelledError: execution cancelled by the orchestrator; {how}"

    async def _finish(
        self, done: DoneFrame, sink: ExecutionSink, timeout: float, ledger: ExecutionLedger
    ) -> ExecutionOutcome:
        status, error = done.status, done.error
        if status == "interrupted":
            status, error = self._interrupt_message(timeout, killed=False)
            await sink.output(Kind.STDERR, error + "\n")
        for stream, marker in ledger.drop_markers():
            await sink.output(stream, marker)
        return ExecutionOutcome(
            status=status,
            error=error,
            stdout_chars=done.stdout_chars,
            stderr_chars=done.stderr_chars,
            truncated_chars=done.truncated_chars + ledger.output.dropped_total,
            variables=done.variables,
            variables_omitted=done.variables_omitted,
            duration=done.duration,
            final_answer_chars=done.final_answer_chars,
        )

    async def _worker_lost(
        self,
        worker: WorkerProcess,
        sink: ExecutionSink,
        timeout: float,
        duration: float,
        ledger: ExecutionLedger,
    ) -> ExecutionOutcome:
        ledger.unanswered()  # nothing more goes to this worker, nor to its replacement
        returncode = await worker.process.wait()
        for stream, marker in ledger.drop_markers():
            await sink.output(stream, marker)
        if worker.violation is not None:
            status = "worker_died"
            error = f"SandboxProtocolError: {PROTOCOL_BROKEN}: {worker.violation}; it was killed"
        elif self._interrupt_reason is not None:
            status, error = self._interrupt_message(timeout, killed=True)
        else:
            status, error = (
                "worker_died",
                f"WorkerDied: the sandbox worker {describe_exit(returncode)}",
            )
        restored = ", ".join(self._loaded) or "nothing"
        error += f". A new worker was started: every variable is lost; reloaded: {restored}."
        await sink.output(Kind.STDERR, error + "\n")
        await self._replace_worker()
        return ExecutionOutcome(
            status=status,
            error=error,
            duration=duration,
            truncated_chars=ledger.output.dropped_total,
            worker_restarted=True,
        )

    async def reset(self) -> None:
        """A fresh worker, an empty work dir, nothing loaded: what the next session gets."""
        async with self._lock:
            if self._worker is not None:
                worker, self._worker = self._worker, None
                await worker.close()
            self._loaded.clear()
            for directory in (self.config.workdir, self.config.state_dir):
                await asyncio.to_thread(shutil.rmtree, directory, True)
                directory.mkdir(parents=True, exist_ok=True)
            await self._spawn()

    async def load_value(self, name: str, alias: str, encoding: str, path: Path) -> dict[str, Any]:
        value = _LoadedValue(name, alias, encoding, path)
        if self.config.isolation != "off":
            from sandbox_agent.jail import share

            share(path, self.config.state_dir)  # the jailed worker's uid must read it
        async with self._lock:
            if self._worker is None:
                await self._replace_worker()
            assert self._worker is not None
            load = encode_json(Kind.LOAD, self._load_request(value))
            loaded = await ask(self._worker, load, Kind.LOADED, parse_loaded)
            if "error" in loaded:
                raise WorkerError(f"could not load {name!r}: {loaded['error']}")
            self._loaded[name] = value
            return loaded

    async def read_variable(
        self,
        name: str,
        *,
        final_answer: bool,
        max_chars: int,
        on_header: Callable[[VariableHeaderFrame], Awaitable[None]],
        on_chunk: Callable[[str], Awaitable[None]],
    ) -> None:
        """A variable's header, then its text in chunks (`execution.read_value`). A worker lost
        meanwhile is replaced."""
        async with self._lock:
            if self._worker is None:
                await self._replace_worker()
            worker = self._worker
            assert worker is not None
            try:
                await read_value(
                    worker, name, final_answer, max_chars, on_header=on_header, on_chunk=on_chunk
                )
            except WorkerError:
                await self._replace_worker()
                raise
