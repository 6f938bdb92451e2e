"""Human-readable progress of a run on stderr (rich): turns, code, live output, sub-calls."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax

from rlm_orchestrator import events as ev

_PREVIEW_CHARS = 300


def _preview(text: str, limit: int = _PREVIEW_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else f"{text[:limit]}… (+{len(text) - limit} chars)"


class EventPrinter:
    """An EventHandler that prints each event as it happens."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)

    def __call__(self, event: ev.Event) -> None:
        out = self.console
        indent = "  " * event.depth
        match event:
            case ev.TurnStarted(iteration=iteration, seconds_left=left):
                time_left = "" if left is None else f" ({left:.0f}s left)"
                out.rule(f"{indent}turn {iteration}{time_left}", style="cyan")
            case ev.RootResponse(text=text, duration=duration, finish_reason=finish):
                cut = " [red]cut at max_tokens[/]" if finish == "length" else ""
                out.print(
                    f"{indent}[bold]root LM[/] ({duration:.2f}s){cut}: {escape(_preview(text))}"
                )
            case ev.CodeBlockStarted(block=block, code=code):
                out.print(f"{indent}[yellow]▶ block {block + 1}[/]")
                out.print(Syntax(code, "python", theme="ansi_dark", line_numbers=False))
            case ev.OutputChunk(stream=stream, text=text):
                style = "red" if stream == "stderr" else "dim"
                out.print(escape(text), style=style, end="", soft_wrap=True)
            case ev.SubCallStarted(call_id=call_id, kind=kind, model=model, prompt_chars=chars):
                target = f" → {model}" if model else ""
                out.print(f"{indent}[magenta]↳ {kind} #{call_id}{target}[/] ({chars} chars)")
            case ev.SubCallFinished(
                call_id=call_id, ok=ok, response_chars=chars, duration=d, error=err
            ):
                status = f"{chars} chars" if ok else f"[red]{escape(_preview(err, 200))}[/]"
                if event.truncated:
                    status += " [red]cut at max_tokens[/]"
                out.print(f"{indent}[magenta]↲ #{call_id}[/] {status} ({d:.2f}s)")
            case ev.CodeBlockFinished(block=block, result=result):
                colour = "green" if result.status == "ok" else "red"
                seconds = result.execution_time
                out.print(
                    f"{indent}[{colour}]■ block {block + 1}: {result.status}[/] ({seconds:.2f}s)"
                )
            case ev.ContextCompacted(stage=stage, tokens_before=before, tokens_after=after):
                out.print(
                    f"{indent}[bold yellow]context compacted[/] ({stage}): ~{before} → ~{after} "
                    f"tokens of a {event.context_window}-token window"
                )
            case ev.Notice(text=text):
                out.print(f"{indent}[bold yellow]note:[/] {escape(_preview(text))}")
            case ev.FinalAnswer(source=source, iterations=iterations):
                out.print(
                    f"{indent}[bold green]final answer[/] ({source}, after {iterations} turn(s))"
                )
            case _:
                pass
