"""`rlm-orchestrator trace`: look at the traces recorded in the local store (RLM_TRACE_STORE)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rlm_orchestrator.telemetry.store import StoredSpan, TraceStore

# The store and the renderers (opentelemetry's SDK, rich's tables) are imported by the
# commands that use them: `rlm-orchestrator run` registers these commands and never needs them.

trace_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None
)

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="The SQLite trace store (default: env RLM_TRACE_STORE, "
        "else ~/.local/share/rlm-orchestrator/traces.db).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
TraceIdArgument = Annotated[
    str | None, typer.Argument(help="A trace id, or a unique prefix of one.")
]
LastOption = Annotated[bool, typer.Option("--last", help="The newest trace.")]


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]error:[/red] {escape(message)}", markup=True
    )
    raise typer.Exit(1)


def _open(store: Path | None) -> TraceStore:
    from rlm_orchestrator.telemetry.store import TraceStore, TraceStoreError, store_path

    try:
        return TraceStore(store_path(store))
    except TraceStoreError as exc:
        _fail(str(exc))


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@trace_app.command("list")
def list_traces(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many traces.")] = 20,
    as_json: JsonOption = False,
    store: StoreOption = None,
) -> None:
    """The newest traces, newest first."""
    from rich.table import Table

    from rlm_orchestrator.telemetry.show import format_cost, format_duration
    from rlm_orchestrator.telemetry.store import TraceStoreError

    try:
        summaries = _open(store).traces(limit)
    except TraceStoreError as exc:
        _fail(str(exc))
    if as_json:
        _print_json([s.to_dict() for s in summaries])
        return
    console = Console(highlight=False)
    if not summaries:
        console.print("no traces yet")
        return
    # Narrow terminals drop the services, then the name, rather than squeezing the numbers.
    wide, medium = console.width >= 130, console.width >= 96
    table = Table(box=None, header_style="bold underline", pad_edge=False)
    headers = ["trace", "name", "start", "duration", "spans", "tokens", "cost", "errors"]
    for header in headers[: 2 if medium else 1]:
        table.add_column(header, no_wrap=True)
    for header in headers[2:]:
        table.add_column(header, no_wrap=True, justify="left" if header == "start" else "right")
    if wide:
        table.add_column("services", no_wrap=True)
    for s in summaries:
        cells = [
            s.trace_id[:16],
            s.name,
            f"{s.start.astimezone():%m-%d %H:%M:%S}",
            format_duration(s.duration_ns),
            str(s.span_count),
            f"{s.input_tokens}→{s.output_tokens}",
            format_cost(s.cost_usd) if s.cost_usd is not None else "-",
            f"[red]{s.error_count}[/red]" if s.error_count else "0",
        ]
        if not medium:
            del cells[1]
        table.add_row(*cells, *([", ".join(s.services)] if wide else []))
    console.print(table)


@trace_app.command()
def show(
    trace_id: TraceIdArgument = None,
    last: LastOption = False,
    as_json: JsonOption = False,
    store: StoreOption = None,
) -> None:
    """One trace as a tree of spans (or nested JSON with --json)."""
    from rlm_orchestrator.telemetry.show import render_tree, trace_to_json

    spans = _trace_spans(trace_id, last, store)
    if as_json:
        _print_json(trace_to_json(spans))
    else:
        Console(highlight=False).print(render_tree(spans))


def _trace_spans(trace_id: str | None, last: bool, store: Path | None) -> list[StoredSpan]:
    """The spans of the trace named by id (or prefix), or of the newest with `last`."""
    from rlm_orchestrator.telemetry.store import TraceStoreError

    if (trace_id is None) == (not last):
        _fail("give a TRACE_ID or --last (not both)" if last else "give a TRACE_ID or --last")
    trace_store = _open(store)
    try:
        if trace_id is not None:
            resolved = trace_store.resolve(trace_id)
        else:
            newest = trace_store.last_trace_id()
            if newest is None:
                _fail(f"no traces in {trace_store.path}")
            resolved = newest
        return trace_store.spans(resolved)
    except TraceStoreError as exc:
        _fail(str(exc))


@trace_app.command("export")
def export(
    trace_id: TraceIdArgument = None,
    last: LastOption = False,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="chrome: Chrome trace events (Perfetto, chrome://tracing); otlp-json: an "
            "OTLP/HTTP JSON ExportTraceServiceRequest.",
        ),
    ] = "chrome",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
    store: StoreOption = None,
) -> None:
    """One trace in a format other viewers read."""
    from rlm_orchestrator.telemetry.export import FORMATS, to_chrome, to_otlp_json

    if export_format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, not {export_format!r}")
    spans = _trace_spans(trace_id, last, store)
    document = to_chrome(spans) if export_format == "chrome" else to_otlp_json(spans)
    text = json.dumps(document, default=str)
    if output is None:
        typer.echo(text)
        return
    try:
        output.write_text(text + "\n")
    except OSError as exc:
        _fail(f"cannot write {output}: {exc}")
