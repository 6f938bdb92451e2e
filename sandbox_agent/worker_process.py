"""The agent's handle on its worker: how it starts, its frames, its signals, its end.

A worker is forked from the agent's worker template when it has one (an agent forked by the
local fork server: milliseconds), else started as a fresh `python -m sandbox_agent.worker`.
Either way it leads a process group of its own (killed as a whole), talks to the agent over
two pipes (commands in, frames out) and keeps no other descriptor of the agent's. Its frames
are read by one task into a bounded inbox, each checked (`protocol.py`) before it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox_agent import strays
from sandbox_agent.execution import Replies
from sandbox_agent.frames import HEADER
from sandbox_agent.inbox import Inbox
from sandbox_agent.protocol import ProtocolError, check_header
from sandbox_agent.template_client import (
    FD_PLACEHOLDER,
    STDIO_INHERIT,
    STDIO_NULL,
    ForkedProcess,
    TemplateClient,
    TemplateError,
)

log = logging.getLogger("sandbox_agent")

WorkerHandle = asyncio.subprocess.Process | ForkedProcess
FRAME_READ_LIMIT = 2**20


# Commands and answers written to a worker that does not read them: past this, it is judged
# to be stalling the agent on purpose (a legitimate worker reads its pipe all the time).
MAX_COMMAND_BACKLOG = 64 * 1024 * 1024


class WorkerProcess:
    """A started worker: its process, the pipes to it, the task reading its frames."""

    def __init__(
        self,
        process: WorkerHandle,
        frames: asyncio.StreamReader,
        commands: asyncio.WriteTransport,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.commands = commands
        self.inbox = Inbox()
        # Why the agent killed this worker, when it broke the protocol.
        self.violation: str | None = None
        self.replies = Replies()
        self._frames = frames
        self.reader = asyncio.create_task(self._read_frames(), name=f"worker-{self.pid}-frames")
        # In the local jail, the pid namespace takes everything with the worker; elsewhere what
        # left its process group is killed after it (strays.py).
        self.jailed = False
        # Children of the agent that are not strays (the worker template).
        self.spared: frozenset[int] = frozenset()

    async def _read_frames(self) -> None:
        try:
            while True:
                size, kind = HEADER.unpack(await self._frames.readexactly(HEADER.size))
                check_header(size, kind)  # before reading (and allocating) the payload
                await self.inbox.put((kind, await self._frames.readexactly(size)))
        except ProtocolError as exc:
            self.fail(str(exc))
        except (asyncio.IncompleteReadError, OSError):
            self.kill()
        finally:
            self.inbox.close()

    def fail(self, violation: str) -> None:
        """The worker broke the protocol: kill it and stop reading; the inbox then ends."""
        if self.violation is None:
            self.violation = violation
        self.kill()
        if self.reader is not asyncio.current_task():
            self.reader.cancel()

    def send(self, data: bytes) -> None:
        if self.commands.is_closing():
            return
        if self.commands.get_write_buffer_size() > MAX_COMMAND_BACKLOG:
            self.fail(f"it stopped reading its commands ({MAX_COMMAND_BACKLOG} bytes waiting)")
            return
        self.commands.write(data)

    async def wait(self) -> int:
        return await self.process.wait()

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
            await strays.kill_strays(spare=self.spared)
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


@dataclass
class WorkerStarter:
    python: str
    workdir: Path
    # The flags of `sandbox_agent.worker` but its two pipes' (--command-fd, --frame-fd).
    flags: Sequence[str]
    template: TemplateClient | None = None

    async def start(self) -> WorkerProcess:
        command_read, command_write = os.pipe()
        frame_read, frame_write = os.pipe()
        try:
            process: WorkerHandle | None = None
            if self.template is not None:
                process = await self._fork(self.template, command_read, frame_write)
            if process is None:
                process = await asyncio.create_subprocess_exec(
                    *(self.python, "-m", "sandbox_agent.worker"),
                    *("--command-fd", str(command_read), "--frame-fd", str(frame_write)),
                    *self.flags,
                    stdin=asyncio.subprocess.DEVNULL,
                    pass_fds=(command_read, frame_write),
                    cwd=self.workdir,
                    start_new_session=True,
                )
        finally:
            os.close(command_read)
            os.close(frame_write)
        loop = asyncio.get_running_loop()
        frames = asyncio.StreamReader(limit=FRAME_READ_LIMIT)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(frames), os.fdopen(frame_read, "rb", 0)
        )
        commands, _ = await loop.connect_write_pipe(
            asyncio.BaseProtocol, os.fdopen(command_write, "wb", 0)
        )
        worker = WorkerProcess(process, frames, commands)
        if self.template is not None:
            worker.spared = frozenset({self.template.pid})
        return worker

    async def _fork(
        self, template: TemplateClient, command_read: int, frame_write: int
    ) -> ForkedProcess | None:
        try:
            return await ForkedProcess.start(
                template,
                "worker",
                ["--command-fd", FD_PLACEHOLDER % 0, "--frame-fd", FD_PLACEHOLDER % 1, *self.flags],
                in_thread=False,
                fds=(command_read, frame_write),
                stdio=(STDIO_NULL, STDIO_INHERIT, STDIO_INHERIT),
                cwd=str(self.workdir),
            )
        except TemplateError as exc:
            # Killed (only an unjailed worker could do that) or out of memory: from now on,
            # workers start as fresh processes.
            log.warning("the worker template is gone (%s): spawning workers instead", exc)
            self.template = None
            template.close()
            return None
