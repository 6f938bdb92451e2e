"""The worker process: runs user code in a persistent namespace, one request at a time.

Started by the agent with two pipe descriptors (commands in, frames out). The main thread
runs the code, so that the agent can stop it with SIGINT (KeyboardInterrupt at the next
bytecode); a reader thread delivers sub-LM answers while the code waits for them. Only the
standard library is imported here: the worker starts in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import linecache
import os
import queue
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox_agent.capture import STDERR, STDOUT, CaptureStream, OutputCapture
from sandbox_agent.fd_capture import FdCapture
from sandbox_agent.frames import BlockingChannel, Kind
from sandbox_agent.limits import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_TMP_SIZE_MB,
    MAX_ERROR_CHARS,
    MAX_NAME_CHARS,
    MAX_VARIABLES,
    NOBODY_UID,
    VALUE_CHUNK_CHARS,
    cut_middle,
)
from sandbox_agent.namespace import LlmBridge, Namespace

MAX_TRACEBACK_FRAMES = 6
PR_SET_PDEATHSIG = 1


class InterruptGate:
    """Turns SIGINT into KeyboardInterrupt only while user code runs, never mid-frame."""

    def __init__(self) -> None:
        self.executing = False
        self._critical_depth = 0
        self._deferred = False

    def handle(self, signum: int, frame: object) -> None:
        if not self.executing:
            return
        if self._critical_depth:
            self._deferred = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # Python runs signal handlers in the main thread only
            return
        self._critical_depth += 1
        try:
            yield
        finally:
            self._critical_depth -= 1
            if not self._critical_depth and self._deferred and self.executing:
                self._deferred = False
                raise KeyboardInterrupt


def die_with_parent() -> None:
    # If the agent is killed, the worker (and its user code) must not outlive it.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _format_exception(exc: BaseException, filename_prefix: str) -> str:
    """A short traceback of the user's frames, ending with `ExceptionType: message`."""
    summary = traceback.TracebackException.from_exception(exc, capture_locals=False)
    frames = list(summary.stack)
    # Drop the worker's own frames above the user code.
    while frames and not frames[0].filename.startswith(filename_prefix):
        frames.pop(0)
    summary.stack = traceback.StackSummary.from_list(frames[-MAX_TRACEBACK_FRAMES:])
    if not frames and not isinstance(exc, SyntaxError):
        return "".join(summary.format_exception_only()).rstrip()
    return "".join(summary.format()).rstrip()


class Worker:
    def __init__(self, channel: BlockingChannel, gate: InterruptGate, max_output: int) -> None:
        self.channel = channel
        self.gate = gate
        self.capture = OutputCapture(channel, max_output)
        self.stdout = CaptureStream(self.capture, STDOUT, 1)
        self.stderr = CaptureStream(self.capture, STDERR, 2)
        self.fd_captures = [FdCapture(1, STDOUT, self.capture), FdCapture(2, STDERR, self.capture)]
        self.bridge = LlmBridge(channel)
        self.namespace = Namespace(self.bridge)
        # SimpleQueue: one lock, in C; the hand-off from the reader thread is on every block.
        self.commands: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self.executions = 0
        self.pid = os.getpid()
        # What the agent reports in GetInfo: "namespaces", "none: <why>", or "off".
        self.isolation = "off"
        # str() of the value a GetVariable is reading, until the agent has all its chunks.
        self.reading: str | None = None

    def read_commands(self) -> None:
        """Reader thread: answers go straight to waiting callers, the rest to the main loop."""
        while True:
            frame = self.channel.receive()
            if frame is None:
                # The agent is gone: nothing can be answered any more.
                os._exit(0)
            kind, payload = frame
            if kind == Kind.LLM_RESPONSE:
                self.bridge.deliver(json.loads(payload))
            else:
                self.commands.put(frame)

    def serve(self) -> None:
        sys.stdout, sys.stderr = self.stdout, self.stderr
        threading.Thread(target=self.read_commands, name="commands", daemon=True).start()
        ready = {"pid": os.getpid(), "python": sys.version.split()[0], "isolation": self.isolation}
        self.channel.send_json(Kind.READY, ready)
        while True:
            frame = self.commands.get()
            if frame is None:
                return
            kind, payload = frame
            request = json.loads(payload)
            if kind == Kind.READ_CHUNK:
                self.channel.send(Kind.CHUNK, self.read_chunk(request))
                continue
            self.reading = None
            if kind == Kind.EXECUTE:
                self.channel.send_json(Kind.DONE, self.execute(request))
            elif kind == Kind.LOAD:
                self.channel.send_json(Kind.LOADED, self.load(request))
            elif kind == Kind.GET_VARIABLE:
                self.channel.send_json(Kind.VARIABLE, self.get_variable(request))

    def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        self.executions += 1
        prefix = "<repl-block-"
        filename = f"{prefix}{self.executions}>"
        code: str = request["code"]
        # Registering the source lets tracebacks show the user's lines.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self.capture.begin(int(request["max_output_chars"]))
        self.namespace.final_answer = None
        status, error = "ok", ""
        started = time.perf_counter()
        try:
            compiled = compile(code, filename, "exec")
            self.gate.executing = True
            try:
                exec(compiled, self.namespace.globals)
            finally:
                self.gate.executing = False
        except KeyboardInterrupt:
            status, error = "interrupted", "KeyboardInterrupt: execution interrupted"
        except BaseException as exc:  # user code may raise anything, SystemExit included
            status, error = "error", _format_exception(exc, prefix)
        if os.getpid() != self.pid:
            # A child that user code forked got here: it must not act as the worker.
            os._exit(0 if status == "ok" else 1)
        duration = time.perf_counter() - started
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.namespace.restore_helpers()
        if status == "error":
            self.capture.write(STDERR, error + "\n")  # the agent words interruptions itself
            error = cut_middle(error, MAX_ERROR_CHARS)
        for original in (sys.__stdout__, sys.__stderr__):
            # Code that wrote to the real files (sys.__stdout__) reaches fd 1/2 on flush.
            if original is not None:
                with contextlib.suppress(Exception):
                    original.flush()
        for fd_capture in self.fd_captures:
            fd_capture.drain()
        totals = self.capture.end()
        variables, omitted = self._listed_variables()
        final = self.namespace.final_answer
        return {
            "status": status,
            "error": error,
            "stdout_chars": totals[STDOUT].chars,
            "stderr_chars": totals[STDERR].chars,
            "truncated_chars": totals[STDOUT].dropped + totals[STDERR].dropped,
            "variables": variables,
            "variables_omitted": omitted,
            "duration": duration,
            # Only the length travels here: the text is read in chunks (GetVariable).
            "final_answer_chars": None if final is None else len(final),
        }

    def _listed_variables(self) -> tuple[list[tuple[str, str]], int]:
        """The user variables as the agent accepts them: a bounded list, bounded names."""
        every = self.namespace.user_variables()
        listed = [
            (name, type_name[:MAX_NAME_CHARS])
            for name, type_name in every
            if len(name) <= MAX_NAME_CHARS
        ][:MAX_VARIABLES]
        return listed, len(every) - len(listed)

    def load(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            with open(request["path"], encoding="utf-8") as source:
                value = json.load(source) if request["encoding"] == "json" else source.read()
        except (OSError, ValueError) as exc:
            return {"error": cut_middle(f"{type(exc).__name__}: {exc}", MAX_ERROR_CHARS)}
        self.namespace.globals[request["name"]] = value
        if request.get("alias"):
            self.namespace.globals[request["alias"]] = value
        length = len(value) if hasattr(value, "__len__") else 0
        return {"type_name": type(value).__name__, "length": length}

    def get_variable(self, request: dict[str, Any]) -> dict[str, Any]:
        """The header of a variable (or of the FINAL_VAR answer); its text is then read in
        chunks (`read_chunk`), so that no frame has to hold a value of any size."""
        available = [name for name, _ in self._listed_variables()[0]]
        if request.get("final"):
            found, value = self.namespace.final_answer is not None, self.namespace.final_answer
        else:
            found, value = self.namespace.lookup(request["name"])
        if not found:
            return {"found": False, "available": available}
        try:
            text = str(value)
        except Exception as exc:  # a user __str__ can fail; say so rather than crash
            text = f"Error: str() of the variable failed: {type(exc).__name__}: {exc}"
        self.reading = str.__str__(text)  # an exact str: a subclass could redefine slicing
        return {
            "found": True,
            "type_name": type(value).__name__[:MAX_NAME_CHARS],
            "chars": len(self.reading),
            "available": available,
        }

    def read_chunk(self, request: dict[str, Any]) -> bytes:
        text = self.reading or ""
        start = int(request["offset"])
        piece = text[start : start + min(int(request["chars"]), VALUE_CHUNK_CHARS)]
        # "replace": a lone surrogate becomes "?", one character for one, as gRPC needs UTF-8.
        return piece.encode("utf-8", "replace")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="rlm sandbox worker (started by the agent)")
    parser.add_argument("--command-fd", type=int, required=True)
    parser.add_argument("--frame-fd", type=int, required=True)
    parser.add_argument("--max-output-chars", type=int, default=DEFAULT_MAX_OUTPUT_CHARS)
    parser.add_argument("--memory-limit-mb", type=int, default=0)
    # Local sandboxes: a jail of namespaces (jail.py) around this worker.
    parser.add_argument("--isolation", choices=("off", "auto", "required"), default="off")
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--state-dir", type=Path, default=Path("."))
    parser.add_argument("--max-processes", type=int, default=DEFAULT_MAX_PROCESSES)
    parser.add_argument("--tmp-size-mb", type=int, default=DEFAULT_TMP_SIZE_MB)
    parser.add_argument("--sandbox-uid", type=int, default=NOBODY_UID)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    die_with_parent()
    isolation = "off"
    if args.isolation != "off":
        isolation = _enter_jail(args)
    die_with_parent()  # again: in the jail, this is a new process whose parent is its init
    if args.memory_limit_mb:
        limit = args.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    gate = InterruptGate()
    signal.signal(signal.SIGINT, gate.handle)
    channel = BlockingChannel(args.command_fd, args.frame_fd, critical=gate.critical)
    worker = Worker(channel, gate, args.max_output_chars)
    worker.isolation = isolation
    worker.serve()


def _enter_jail(args: argparse.Namespace) -> str:
    """Returns (in the process that runs user code) what isolation it got; exits when the
    jail is required and the kernel refused it."""
    from sandbox_agent.jail import ISOLATED, JailConfig, enter

    isolation = enter(
        JailConfig(
            workdir=args.workdir,
            state_dir=args.state_dir,
            max_processes=args.max_processes,
            tmp_size_mb=args.tmp_size_mb,
            sandbox_uid=args.sandbox_uid,
            sandbox_gid=args.sandbox_uid,
            keep_fds=(args.command_fd, args.frame_fd),
        )
    )
    if isolation != ISOLATED and args.isolation == "required":
        sys.exit(f"sandbox isolation is required but unavailable: {isolation}")
    return isolation


if __name__ == "__main__":
    main()
