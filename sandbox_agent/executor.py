"""The agent's side of the worker: start it, run code in it, stop it, replace it.

Everything here is asyncio and never blocks the agent's event loop. The worker is a child
process in a process group of its own, so that stopping runaway code can take its children
with it. Frames from the worker are read by one task into a queue: waiting on the queue can
be cancelled or timed out without ever cutting a frame in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sandbox_agent import strays
from sandbox_agent.frames import HEADER, MAX_FRAME_BYTES, Kind, encode, encode_json

TIMEOUT, CANCELLED = "timeout", "cancelled"


@dataclass
class ExecutorConfig:
    workdir: Path
    # Loaded values (contexts, histories) are kept here, to load them again into a new worker.
    state_dir: Path
    exec_timeout_seconds: float = 300.0
    max_output_chars: int = 1_000_000
    memory_limit_mb: int = 0
    # How long interrupted code gets to stop before its process group is killed.
    interrupt_grace_seconds: float = 2.0
    python: str = sys.executable
    # Local sandboxes only: the worker in a jail of namespaces (jail.py). "off"; "auto" (when
    # the kernel allows it, else the worker runs as without); "required" (else it fails).
    isolation: str = "off"
    max_processes: int = 128  # in the jail (RLIMIT_NPROC of its user namespace)
    tmp_size_mb: int = 256  # the jail's /tmp
    sandbox_uid: int = 65534  # who user code is outside the jail when the agent runs as root


class ExecutionSink(Protocol):
    """Where an execution's output and sub-LM requests go (the gRPC stream, in the agent)."""

    async def output(self, stream: int, text: str) -> None: ...

    async def llm_request(
        self, request_id: int, prompts: list[str], model: str, kind: str
    ) -> None: ...


@dataclass
class ExecutionOutcome:
    status: str  # ok | error | timeout | worker_died | cancelled
    error: str = ""
    stdout_chars: int = 0
    stderr_chars: int = 0
    truncated_chars: int = 0
    variables: list[tuple[str, str]] = field(default_factory=list)
    duration: float = 0.0
    final_answer: str | None = None
    worker_restarted: bool = False


class WorkerError(Exception):
    """The worker could not do what was asked (it died, or refused the request)."""


@dataclass
class _LoadedValue:
    name: str
    alias: str
    encoding: str
    path: Path


class _WorkerProcess:
    def __init__(
        self,
        process: asyncio.subprocess.Process,
        frames: asyncio.StreamReader,
        commands: asyncio.WriteTransport,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.commands = commands
        self.inbox: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self._frames = frames
        self.reader = asyncio.create_task(self._read_frames(), name=f"worker-{self.pid}-frames")
        # In the local jail, the pid namespace takes everything with the worker; elsewhere what
        # left its process group is killed after it (strays.py).
        self.jailed = False

    async def _read_frames(self) -> None:
        try:
            while True:
                size, kind = HEADER.unpack(await self._frames.readexactly(HEADER.size))
                if size > MAX_FRAME_BYTES:
                    raise WorkerError(f"worker sent a frame of {size} bytes")
                self.inbox.put_nowait((kind, await self._frames.readexactly(size)))
        except (asyncio.IncompleteReadError, WorkerError, OSError):
            self.kill()
        finally:
            self.inbox.put_nowait(None)

    def send(self, data: bytes) -> None:
        if not self.commands.is_closing():
            self.commands.write(data)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def kill(self) -> None:
        # The worker leads its own process group: this also ends what user code forked.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        self.kill()
        self.commands.close()
        await self.process.wait()
        if not self.jailed:
            await strays.kill_strays()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped responding"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"was killed by signal {name}{hint}"
    return f"exited with code {returncode}"


class Executor:
    """Runs code blocks, one at a time, in a worker that it replaces when it dies."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.workers_started = 0
        self._worker: _WorkerProcess | None = None
        self._lock = asyncio.Lock()
        self._loaded: dict[str, _LoadedValue] = {}
        self._interrupt_reason: str | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        # What the current worker got: "namespaces", "none: <why>" or "off" (from its READY).
        self.isolation = "off"

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
        command_read, command_write = os.pipe()
        frame_read, frame_write = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                self.config.python,
                "-m",
                "sandbox_agent.worker",
                "--command-fd",
                str(command_read),
                "--frame-fd",
                str(frame_write),
                "--max-output-chars",
                str(self.config.max_output_chars),
                "--memory-limit-mb",
                str(self.config.memory_limit_mb),
                *self._isolation_args(),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(command_read, frame_write),
                cwd=self.config.workdir,
                start_new_session=True,
            )
        finally:
            os.close(command_read)
            os.close(frame_write)
        loop = asyncio.get_running_loop()
        frames = asyncio.StreamReader(limit=2**20)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(frames), os.fdopen(frame_read, "rb", 0)
        )
        transport, _ = await loop.connect_write_pipe(
            asyncio.BaseProtocol, os.fdopen(command_write, "wb", 0)
        )
        self._worker = _WorkerProcess(process, frames, transport)
        self.workers_started += 1
        ready = await self._reply(self._worker, Kind.READY)
        self.isolation = str(ready.get("isolation", "off"))
        self._worker.jailed = self.isolation == "namespaces"

    def _isolation_args(self) -> list[str]:
        config = self.config
        if config.isolation == "off":
            return []
        return [
            *("--isolation", config.isolation),
            *("--workdir", str(config.workdir), "--state-dir", str(config.state_dir)),
            *("--max-processes", str(config.max_processes)),
            *("--tmp-size-mb", str(config.tmp_size_mb)),
            *("--sandbox-uid", str(config.sandbox_uid)),
        ]

    async def _reply(self, worker: _WorkerProcess, expected: int) -> dict[str, Any]:
        """The next frame of kind `expected`; strays from background threads are dropped."""
        while True:
            frame = await worker.inbox.get()
            if frame is None:
                returncode = await worker.process.wait()
                raise WorkerError(f"the sandbox worker {_describe_exit(returncode)}")
            kind, payload = frame
            if kind == expected:
                result: dict[str, Any] = json.loads(payload)
                return result
            if kind == Kind.LLM_REQUEST:
                request = json.loads(payload)
                worker.send(self._refusal(request["id"], len(request["prompts"])))

    @staticmethod
    def _refusal(request_id: int, count: int) -> bytes:
        error = "Error: llm_query was called outside of a running execution"
        return encode_json(Kind.LLM_RESPONSE, {"id": request_id, "results": [error] * count})

    async def _replace_worker(self) -> None:
        if self._worker is not None:
            await self._worker.close()
            self._worker = None
        await self._spawn()
        assert self._worker is not None
        for value in self._loaded.values():
            self._worker.send(encode_json(Kind.LOAD, self._load_request(value)))
            await self._reply(self._worker, Kind.LOADED)

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
        if self._worker is not None:
            self._worker.send(
                encode_json(Kind.LLM_RESPONSE, {"id": request_id, "results": list(results)})
            )

    async def execute(
        self, code: str, sink: ExecutionSink, timeout_seconds: float = 0, max_output_chars: int = 0
    ) -> ExecutionOutcome:
        timeout = timeout_seconds or self.config.exec_timeout_seconds
        async with self._lock:
            if self._worker is None:
                await self._replace_worker()
            worker = self._worker
            assert worker is not None
            self._interrupt_reason = None
            loop = asyncio.get_running_loop()
            started = loop.time()
            worker.send(
                encode_json(
                    Kind.EXECUTE,
                    {
                        "code": code,
                        "max_output_chars": max_output_chars or self.config.max_output_chars,
                    },
                )
            )
            try:
                return await self._follow(worker, sink, started + timeout, timeout)
            finally:
                if self._kill_timer:
                    self._kill_timer.cancel()
                    self._kill_timer = None
                self._interrupt_reason = None

    async def _follow(
        self, worker: _WorkerProcess, sink: ExecutionSink, deadline: float, timeout: float
    ) -> ExecutionOutcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if self._interrupt_reason is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        frame = await worker.inbox.get()
                except TimeoutError:
                    self.interrupt(TIMEOUT)
                    continue
            else:
                frame = await worker.inbox.get()  # the kill timer bounds this wait
            if frame is None:
                return await self._worker_lost(worker, sink, timeout, loop.time() - started)
            kind, payload = frame
            if kind in (Kind.STDOUT, Kind.STDERR):
                await sink.output(kind, payload.decode("utf-8", "replace"))
            elif kind == Kind.LLM_REQUEST:
                request = json.loads(payload)
                await sink.llm_request(
                    int(request["id"]), request["prompts"], request["model"], request["kind"]
                )
            elif kind == Kind.DONE:
                return await self._finish(json.loads(payload), sink, timeout)

    def _interrupt_message(self, timeout: float, killed: bool) -> tuple[str, str]:
        how = "its process group was killed" if killed else "it was interrupted"
        if self._interrupt_reason == TIMEOUT:
            return TIMEOUT, f"TimeoutError: execution exceeded {timeout:g} seconds; {how}"
        return CANCELLED, f"CancelledError: execution cancelled by the orchestrator; {how}"

    async def _finish(
        self, done: dict[str, Any], sink: ExecutionSink, timeout: float
    ) -> ExecutionOutcome:
        status, error = done["status"], done["error"]
        if status == "interrupted":
            status, error = self._interrupt_message(timeout, killed=False)
            await sink.output(Kind.STDERR, error + "\n")
        return ExecutionOutcome(
            status=status,
            error=error,
            stdout_chars=done["stdout_chars"],
            stderr_chars=done["stderr_chars"],
            truncated_chars=done["truncated_chars"],
            variables=[(n, t) for n, t in done["variables"]],
            duration=done["duration"],
            final_answer=done["final_answer"],
        )

    async def _worker_lost(
        self, worker: _WorkerProcess, sink: ExecutionSink, timeout: float, duration: float
    ) -> ExecutionOutcome:
        returncode = await worker.process.wait()
        if self._interrupt_reason is not None:
            status, error = self._interrupt_message(timeout, killed=True)
        else:
            status, error = (
                "worker_died",
                f"WorkerDied: the sandbox worker {_describe_exit(returncode)}",
            )
        restored = ", ".join(self._loaded) or "nothing"
        error += f". A new worker was started: every variable is lost; reloaded: {restored}."
        await sink.output(Kind.STDERR, error + "\n")
        await self._replace_worker()
        return ExecutionOutcome(
            status=status, error=error, duration=duration, worker_restarted=True
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
            self._worker.send(encode_json(Kind.LOAD, self._load_request(value)))
            reply = await self._reply(self._worker, Kind.LOADED)
            if "error" in reply:
                raise WorkerError(f"could not load {name!r}: {reply['error']}")
            self._loaded[name] = value
            return reply

    async def get_variable(self, name: str, max_chars: int) -> dict[str, Any]:
        async with self._lock:
            if self._worker is None:
                await self._replace_worker()
            assert self._worker is not None
            self._worker.send(
                encode(
                    Kind.GET_VARIABLE, json.dumps({"name": name, "max_chars": max_chars}).encode()
                )
            )
            return await self._reply(self._worker, Kind.VARIABLE)
