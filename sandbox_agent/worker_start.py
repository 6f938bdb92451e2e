"""How the agent starts its worker: forked from its worker template when it has one (an agent
forked by the local fork server: milliseconds), else a fresh `python -m sandbox_agent.worker`.

Either way the worker leads a process group of its own (killed as a whole), talks to the agent
over two pipes (commands in, frames out) and keeps no other descriptor of the agent's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class StartedWorker:
    process: WorkerHandle
    frames: asyncio.StreamReader  # what the worker writes
    commands: asyncio.WriteTransport  # what it reads
    spared: frozenset[int]  # children of the agent that are not the worker's strays


@dataclass
class WorkerStarter:
    python: str
    workdir: Path
    # The flags of `sandbox_agent.worker` but its two pipes' (--command-fd, --frame-fd).
    flags: Sequence[str]
    template: TemplateClient | None = None

    async def start(self) -> StartedWorker:
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
        spared = frozenset({self.template.pid}) if self.template is not None else frozenset()
        return StartedWorker(process, frames, commands, spared)

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
