"""The local provider's agent template: a fork server that starts agents in milliseconds.

`python -m sandbox_agent.forkserver` imports the agent and the worker once; each sandbox is
then a fork() of it (and its worker a fork of a template the agent forks at once), instead
of two Python start-ups. One template per provider, started on first use (with the
environment of a sandbox: nothing of the orchestrator's), stopped at the provider's close;
it also ends when this process does. What it writes on stderr reaches this log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import threading
import weakref
from typing import IO, Any

from rlm_orchestrator.exceptions import SandboxError
from sandbox_agent.template_client import ForkedProcess, TemplateClient, TemplateError

log = logging.getLogger("rlm_orchestrator.sandbox.local")

READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 3.0


class AgentTemplate:
    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.python = python
        self.env = env
        self._client: TemplateClient | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._starting = threading.Lock()  # a provider may be used from several event loops
        self._finalizer: (
            weakref.finalize[[socket.socket, subprocess.Popen[bytes]], AgentTemplate] | None
        ) = None

    async def client(self) -> TemplateClient:
        if self._client is None:
            await asyncio.to_thread(self._start_once)
        assert self._client is not None
        return self._client

    def _start_once(self) -> None:
        with self._starting:
            if self._client is None:
                self._client = self._start()

    def _start(self) -> TemplateClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "sandbox_agent.forkserver",
                    "--socket-fd",
                    str(theirs.fileno()),
                    "--parent-pid",
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                env=self.env,
                cwd="/",
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.settimeout(READY_TIMEOUT_SECONDS)
        try:
            ready = ours.recv(4096)
        except OSError:
            ready = b""
        if not ready:
            ours.close()
            process.kill()
            _, errors = process.communicate()
            raise SandboxError(
                "the local sandbox template did not start; it said:\n"
                + errors.decode(errors="replace")[-2000:]
            )
        ours.settimeout(None)
        self._process = process
        # A provider dropped without aclose() (or still open at exit) stops its template too.
        self._finalizer = weakref.finalize(self, _stop_now, ours, process)
        assert process.stderr is not None
        threading.Thread(
            target=_log_lines, args=(process.stderr,), name="rlm-template-log", daemon=True
        ).start()
        return TemplateClient(ours, process.pid)

    async def start_agent(self, argv: list[str], **how: Any) -> ForkedProcess:
        """Fork an agent; a template that died (killed, out of memory) is replaced once."""
        for attempt in (1, 2):
            client = await self.client()
            try:
                return await ForkedProcess.start(client, "agent", argv, **how)
            except TemplateError as exc:
                if attempt == 2:
                    raise SandboxError(f"the local sandbox template failed: {exc}") from exc
                log.warning("the local sandbox template is gone (%s): starting a new one", exc)
                if self._client is client:
                    await self.aclose()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        client, process = self._client, self._process
        self._client = self._process = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if client is not None:
            client.close()  # the template exits when its socket closes
        if process is not None:
            try:
                await asyncio.to_thread(process.wait, STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)


def _stop_now(sock: socket.socket, process: subprocess.Popen[bytes]) -> None:
    sock.close()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _log_lines(stream: IO[bytes]) -> None:
    with stream:
        for line in stream:
            log.warning("sandbox template: %s", line.decode(errors="replace").rstrip())
