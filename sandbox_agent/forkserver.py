"""Start agents and workers by fork() from a template that has already imported them.

A fresh local sandbox costs two Python start-ups (agent, then worker), ~200 ms of imports on
this kind of machine. A template process imports what they run once; each start is then a
fork() of it (a few ms), and the child shares the template's pages until it writes them.

The same code serves two templates:

    orchestrator ── agent template (`python -m sandbox_agent.forkserver`, one per provider)
                      └── agent (forked)  ── worker template (forked by the agent at once)
                                                └── worker (forked; jails itself as before)

What keeps a fork safe here:
- A template is single-threaded and has never created a grpc server or channel (grpc's core
  does not survive a fork); an agent forks its worker template before it starts grpc.
- A template never holds a secret: an agent reads its token from a pipe after the fork, and
  its worker template was forked before that, so no worker's memory ever held it.
- A child keeps only the descriptors it was sent: the template's socket would let code start
  processes outside its jail.
- A child re-seeds `random` (it would repeat its template's sequence).

Wire: a SOCK_SEQPACKET socket pair, one JSON message per request and reply, descriptors
attached (SCM_RIGHTS). `spawn` answers with the child's pid and a pidfd of it (opened before
the template could reap it, so it can never name another process); `exit_status` with its
code once it has ended. The template exits when its socket closes or its owner ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from sandbox_agent.template_client import (
    FD_PLACEHOLDER,
    STDIO_INHERIT,
    STDIO_NULL,
    TemplateClient,
    receive,
    send,
)

_EXIT_CODES_KEPT = 4096
AGENT_TEMPLATE_NAME, WORKER_TEMPLATE_NAME = "rlm-template", "rlm-worker-tpl"

Target = Callable[[list[str], dict[str, int]], None]


# -- the template's side ---------------------------------------------------------------------


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class _Template:
    def __init__(self, sock: socket.socket, targets: dict[str, Target], inherit: dict[str, int]):
        self.sock = sock
        self.targets = targets
        self.inherit = inherit  # descriptors every child keeps, by name (an owner's pidfd)
        self.exit_codes: dict[int, int] = {}

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if len(self.exit_codes) >= _EXIT_CODES_KEPT:
                self.exit_codes.pop(next(iter(self.exit_codes)))
            self.exit_codes[pid] = _exit_code(status)

    def handle(self, request: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        if request.get("op") == "exit_status":
            pid = int(request["pid"])
            if pid not in self.exit_codes:
                with contextlib.suppress(ChildProcessError):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        self.exit_codes[done] = _exit_code(status)
            return {"code": self.exit_codes.pop(pid, None)}, []
        if request.get("op") != "spawn" or request.get("target") not in self.targets:
            return {"error": f"unknown request {request.get('op')!r}"}, []
        pid = os.fork()
        if pid == 0:
            self._become(request, fds)
        pidfd = os.pidfd_open(pid)
        return {"pid": pid}, [pidfd]

    def _become(self, request: dict[str, Any], fds: list[int]) -> NoReturn:
        code = 1
        try:
            _reset_signals()
            set_process_name(f"rlm-{request['target']}")
            self.sock.close()
            os.setsid()
            argv = [_fill(arg, fds) for arg in request["argv"]]
            devnull = os.open(os.devnull, os.O_RDWR)
            for target_fd, index in enumerate(request.get("stdio", [STDIO_NULL] * 3)):
                if index != STDIO_INHERIT:
                    os.dup2(fds[index] if index >= 0 else devnull, target_fd)
            os.close(devnull)
            _close_all_but({0, 1, 2, *fds, *self.inherit.values()})
            os.chdir(request.get("cwd") or "/")
            if request.get("env") is not None:
                os.environ.clear()
                os.environ.update(request["env"])
            if "random" in sys.modules:
                sys.modules["random"].seed()
            sys.argv = [request["target"], *argv]
            self.targets[request["target"]](argv, dict(self.inherit))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def serve(self, watch: int | None = None) -> None:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake select()
        waiting: list[int] = [self.sock.fileno(), wake_read]
        if watch is not None:
            waiting.append(watch)
        while True:
            readable, _, _ = select.select(waiting, [], [])
            if wake_read in readable:
                os.read(wake_read, 4096)
            self.reap()
            if watch is not None and watch in readable:
                return  # the owner ended
            if self.sock.fileno() in readable:
                message, fds = receive(self.sock)
                if message is None:
                    return  # the owner closed the socket
                try:
                    reply, reply_fds = self.handle(message, fds)
                except Exception as exc:  # a bad request is answered, never fatal
                    reply, reply_fds = {"error": f"{type(exc).__name__}: {exc}"}, []
                finally:
                    for fd in fds:
                        os.close(fd)
                send(self.sock, reply, reply_fds)
                for fd in reply_fds:
                    os.close(fd)


def set_process_name(name: str) -> None:
    """What `ps -o comm` and psutil's name() show: forked processes share their template's
    command line, this tells them apart (at most 15 bytes)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def _fill(arg: str, fds: list[int]) -> str:
    for index, fd in enumerate(fds):
        arg = arg.replace(FD_PLACEHOLDER % index, str(fd))
    return arg


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def fork_template(targets: dict[str, Target]) -> TemplateClient:
    """Fork a template of this process (which must be single-threaded, grpc untouched). It
    dies with this process's main thread (PDEATHSIG) and when the client is closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            # Nothing of the owner's but stdio: not its token's pipe, not its owner's pidfd.
            _close_all_but({0, 1, 2, theirs.fileno()})
            set_process_name(WORKER_TEMPLATE_NAME)
            from sandbox_agent.worker import die_with_parent

            die_with_parent()
            _Template(theirs, targets, {}).serve()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    return TemplateClient(ours, pid)


# -- the orchestrator's agent template: `python -m sandbox_agent.forkserver` ------------------


def _run_agent(argv: list[str], inherited: dict[str, int]) -> None:
    """An agent forked from the template: its worker template first (before the token and
    before grpc), then the agent as `python -m sandbox_agent` would run."""
    from sandbox_agent import __main__ as agent_main
    from sandbox_agent.worker import main as worker_main

    workers = fork_template({"worker": lambda argv, _inherited: worker_main(argv)})
    owner = inherited.get("owner_pidfd")
    agent_main.main(argv, worker_template=workers, parent_pidfd=owner)


def _warm_up() -> None:
    """Once here what every child would do first: argparse compiles its regular expressions
    on each parser (`re`'s cache is inherited across fork())."""
    from sandbox_agent import __main__ as agent_main
    from sandbox_agent import worker

    agent_main.parse_args(["--listen", "unix:/nonexistent", "--workdir", "/nonexistent"])
    worker.parse_args(["--command-fd", "0", "--frame-fd", "1", "--isolation", "auto"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fork local sandbox agents from a template")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when it ends")
    args = parser.parse_args(argv)
    # Everything an agent and a worker import, imported once here (no grpc object created).
    import sandbox_agent.__main__
    import sandbox_agent.jail
    import sandbox_agent.worker  # noqa: F401

    try:
        owner = os.pidfd_open(args.parent_pid)
    except ProcessLookupError:
        sys.exit(f"the orchestrator (pid {args.parent_pid}) is gone")
    if os.getppid() != args.parent_pid:
        sys.exit(f"the orchestrator (pid {args.parent_pid}) is gone")
    set_process_name(AGENT_TEMPLATE_NAME)
    _warm_up()
    sock = socket.socket(fileno=args.socket_fd)
    send(sock, {"ready": os.getpid()})
    _Template(sock, {"agent": _run_agent}, {"owner_pidfd": owner}).serve(watch=owner)


if __name__ == "__main__":
    # Run the module's own copy, not `__main__`'s: its classes are the ones the agent catches.
    from sandbox_agent.forkserver import main as forkserver_main

    forkserver_main()
