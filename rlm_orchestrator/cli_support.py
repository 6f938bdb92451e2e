"""What the CLI's commands share: reading the context file, one-line refusals, the version and
`--debug`, and the entry point that turns any error into one line on stderr.

Exit codes: 2 for a usage or configuration error (a bad flag, file or setting), 1 for a failure
at run time (the LM, the sandbox, a limit), 130 for Ctrl-C. A traceback only with `--debug`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

stderr = Console(stderr=True, highlight=False)
USAGE_ERROR = 2
INTERRUPTED = 130


class _State:
    debug = False


state = _State()


def _set_debug(value: bool) -> None:
    if value:
        state.debug = True


# `--debug` after a command too (`run ... --debug`), as well as before it.
DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug",
        callback=_set_debug,
        expose_value=False,
        help="Show the traceback of an unexpected error.",
    ),
]


def usage_error(message: str, kind: str = "error") -> NoReturn:
    """One line on stderr (as it is: no markup, no wrapping), and exit code 2."""
    stderr.print(f"[bold red]{kind}:[/]", escape(message), soft_wrap=True)
    raise typer.Exit(USAGE_ERROR) from None


def configuration_error(exc: Exception) -> NoReturn:
    usage_error(str(exc), "configuration error")


def read_context(source: str, context_format: str) -> Any:
    """The context as text (or JSON): a file that cannot be read as text is a usage error."""
    text = sys.stdin.read() if source == "-" else _read_text(Path(source))
    if context_format == "json" or (context_format == "auto" and source.endswith(".json")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            usage_error(f"--context {source}: not valid JSON: {exc}")
    return text


def _read_text(path: Path) -> str:
    why: str
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        why = "no such file"
    except IsADirectoryError:
        why = "a directory, not a file"
    except PermissionError:
        why = "not readable (permission denied)"
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 text (byte {exc.start}); pass text, or JSON with --context-format json"
    except OSError as exc:
        why = f"cannot be read: {exc.strerror or exc}"
    usage_error(f"--context {path}: {why}")


# Seconds of silence after which `run` says what it is waiting for.
STATUS_AFTER_SECONDS = 0.5


class StartupStatus:
    """One status line on stderr when the first event is more than STATUS_AFTER_SECONDS
    away (imports, the sandbox's start, litellm's import): silence would look like a hang."""

    def __init__(self, quiet: bool) -> None:
        self._timer: threading.Timer | None = None
        if not quiet:
            self._timer = threading.Timer(STATUS_AFTER_SECONDS, self._say)
            self._timer.daemon = True
            self._timer.start()

    @staticmethod
    def _say() -> None:
        stderr.print("[dim]starting: a sandbox, and the LM client...[/]")

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def print_result(result: Any, quiet: bool, as_json: bool) -> None:
    """The answer on stdout (or the result as JSON: turns, answer_source, usage, no context);
    on stderr, what it cost and, even with --quiet, a note when it is no chosen answer."""
    if as_json:
        data = result.to_dict()
        # The context is the user's own input: not echoed back (it may be megabytes).
        data.pop("prompt", None)
        print(json.dumps(data, indent=2))
    else:
        print(result.response)
        if result.out_of_turns:
            # Exit code 0 as the original, but never mistaken for an answer the model chose.
            stderr.print(
                f"[bold yellow]note:[/] no final answer within {result.iterations} turn(s): "
                "the answer above is the model's reply when asked for one after its last "
                "turn (answer_source out_of_turns; raise --max-iterations?)",
                soft_wrap=True,
            )
    if not quiet:
        usage = result.usage_summary
        how = f", {result.answer_source}" if result.answer_source else ""
        stderr.print(
            f"[dim]{result.iterations} turn(s){how}, {usage.total_calls} LM calls, "
            f"${usage.total_cost:.4f}, {result.execution_time:.1f}s[/]"
        )


def fail(exc: Exception, as_json: bool = False) -> typer.Exit:
    """A failure at run time: one line (as it is: no markup, no wrapping), and exit code 1;
    then what the completion had done: turns and usage, the partial answer. With --json, the
    same as a JSON object on stdout."""
    message = " ".join(str(exc).split())
    stderr.print(
        f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(message)}", soft_wrap=True
    )
    partial = getattr(exc, "partial_answer", None)
    usage = getattr(exc, "usage_summary", None)
    iterations = getattr(exc, "iterations", 0)
    if usage is not None and usage.total_calls:  # nothing paid: the error line says it all
        stderr.print(
            f"[dim]stopped after {iterations} turn(s): {usage.total_calls} LM calls, "
            f"${usage.total_cost:.4f}[/]"
        )
    if partial:
        stderr.print(f"[yellow]partial answer:[/] {escape(str(partial))}", soft_wrap=True)
    if as_json:
        error = {
            "error": {"type": type(exc).__name__, "message": str(exc)},
            "iterations": iterations,
            "usage_summary": usage.to_dict() if usage is not None else None,
            "partial_answer": partial,
            "last_response": getattr(exc, "last_response", None),
        }
        print(json.dumps(error, indent=2))
    return typer.Exit(1)


def version() -> str:
    from rlm_orchestrator import __version__

    return __version__


def show_version(value: bool) -> None:
    """An eager option's callback: `--version` prints it and exits at once."""
    if value:
        print(f"rlm-orchestrator {version()}")
        raise typer.Exit()


def run_app(app: typer.Typer) -> NoReturn:
    """Run `app` as the console entry point: any error is one line (a traceback with --debug).

    Once litellm is loaded, the interpreter's teardown of its module graph takes a second or
    more after the answer is printed: the process ends without it, after the exit handlers
    (trace export, ...). Every sandbox is released by then (the completion's own cleanup)."""
    code: Any = 0
    try:
        # Not standalone: click's usage errors come here, to be said in one line.
        code = app(standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        code = INTERRUPTED
    except typer.Abort:
        stderr.print("[bold red]aborted[/]")
        code = 1
    except Exception as exc:
        if _is_click_error(exc):
            code = _usage_error(exc)
        elif state.debug:
            raise
        else:
            code = _unexpected(exc)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    if code == INTERRUPTED:
        # typer turns Ctrl-C into exit code 130, silently. The interpreter's teardown would
        # then collect what the interrupted calls left (gRPC tasks, coroutines) with a
        # warning each: skipped, after the exit handlers (the sandbox's release among them).
        stderr.print("[bold red]interrupted[/]")
        exit_now(code)
    if "litellm" not in sys.modules:
        sys.exit(code)
    exit_now(code)


def _unexpected(exc: Exception) -> int:
    message = " ".join(str(exc).split()) or "(no message)"
    stderr.print(
        f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(message)} "
        "[dim](--debug shows the traceback)[/]",
        soft_wrap=True,
    )
    return 1


def _is_click_error(exc: Exception) -> bool:
    # typer carries its own copy of click: its exceptions are known by their attributes.
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def _usage_error(exc: Any) -> int:
    """A click error (a usage error: an unknown option, a bad value...) as one line; the help
    when the command was given no arguments."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()
        return int(exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    message = " ".join(exc.format_message().split())
    stderr.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", soft_wrap=True)
    return int(exc.exit_code)


def exit_now(code: int) -> NoReturn:
    telemetry = sys.modules.get("rlm_orchestrator.telemetry")
    if telemetry is not None:
        telemetry.shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe: nothing more can be said there.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
