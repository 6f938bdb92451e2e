"""The owner's side of a fork server's template (forkserver.py): asking it to start a
process, and a handle on what it started.

`TemplateClient` talks to a template over its SEQPACKET socket (one JSON message per request
and reply, descriptors attached); `ForkedProcess` is what asyncio.subprocess.Process offers for
a process that is not our child: its end seen on a pidfd, its exit code asked of the template.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import threading
from collections.abc import Sequence
from typing import Any

MAX_MESSAGE = 1 << 20
MAX_FDS = 8
FD_PLACEHOLDER = "{fd:%d}"  # in argv: replaced by the number of the descriptor sent at index i
STDIO_NULL, STDIO_INHERIT = -1, -2  # a child's stdin/out/err: /dev/null, the template's, or sent
UNKNOWN_EXIT_CODE = 255  # the template ended before it could say


class TemplateError(Exception):
    """The template refused or could not start a process (or is gone)."""


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    data, fds, _flags, _address = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


class TemplateClient:
    """The owner's end of a template's socket. Blocking and thread-safe: one request at a
    time (a fork takes milliseconds); async callers use a thread."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self._lock = threading.Lock()

    def spawn(
        self,
        target: str,
        argv: Sequence[str],
        *,
        fds: Sequence[int] = (),
        stdio: Sequence[int] = (STDIO_NULL, STDIO_NULL, STDIO_NULL),
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[int, int]:
        """Fork a child running `target(argv)`; returns its pid and a pidfd of it. `fds` are
        sent along and kept open in the child: `stdio` indexes them, and `FD_PLACEHOLDER % i`
        in argv becomes the number of the i-th."""
        request = {
            "op": "spawn",
            "target": target,
            "argv": list(argv),
            "stdio": list(stdio),
            "cwd": cwd,
            "env": env,
        }
        reply, reply_fds = self._ask(request, fds)
        if "error" in reply or len(reply_fds) != 1:
            for fd in reply_fds:
                os.close(fd)
            raise TemplateError(f"the template could not start a process: {reply.get('error')}")
        return int(reply["pid"]), reply_fds[0]

    def exit_status(self, pid: int) -> int | None:
        reply, _ = self._ask({"op": "exit_status", "pid": pid})
        code = reply.get("code")
        return None if code is None else int(code)

    def _ask(
        self, request: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            try:
                send(self.sock, request, fds)
                reply, reply_fds = receive(self.sock)
            except OSError as exc:
                raise TemplateError(f"the template is gone: {exc}") from exc
        if reply is None:
            raise TemplateError("the template is gone")
        return reply, reply_fds

    def close(self) -> None:
        self.sock.close()


class ForkedProcess:
    """What asyncio.subprocess.Process offers (pid, returncode, wait, signals), for a process a
    template forked: not our child, so its end is seen on its pidfd and its code is asked of
    the template. Usable from any event loop (one at a time)."""

    def __init__(self, template: TemplateClient, pid: int, pidfd: int) -> None:
        self.template = template
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._ended: asyncio.Future[None] | None = None

    @classmethod
    async def start(
        cls,
        template: TemplateClient,
        target: str,
        argv: Sequence[str],
        *,
        in_thread: bool = True,
        **how: Any,
    ) -> ForkedProcess:
        """`in_thread=False` blocks the event loop for the fork (a few ms): for an agent
        starting its worker, where a thread would cost more than it saves."""
        if in_thread:
            spawn = asyncio.ensure_future(asyncio.to_thread(template.spawn, target, argv, **how))
            try:
                pid, pidfd = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                # The fork happens anyway: its child (and its process group) must not stay.
                with contextlib.suppress(Exception):
                    pid, pidfd = await spawn
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                    os.close(pidfd)
                raise
        else:
            pid, pidfd = template.spawn(target, argv, **how)
        return cls(template, pid, pidfd)

    async def wait(self) -> int:
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            if self._ended is None or self._ended.get_loop() is not loop:
                self._ended = ended = loop.create_future()

                def on_end() -> None:
                    loop.remove_reader(self._pidfd)
                    if not ended.done():
                        ended.set_result(None)

                loop.add_reader(self._pidfd, on_end)
            await asyncio.shield(self._ended)
            if self.returncode is None:
                try:
                    code = self.template.exit_status(self.pid)
                except TemplateError:
                    code = None
                self.returncode = UNKNOWN_EXIT_CODE if code is None else code
                os.close(self._pidfd)
        return self.returncode

    def has_ended(self) -> bool:
        """Without waiting: whether it has ended (seen or not)."""
        if self.returncode is not None:
            return True
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
