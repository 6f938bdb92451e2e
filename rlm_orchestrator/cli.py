"""`rlm-orchestrator`: run an RLM from the command line (answer on stdout, progress on stderr)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from rlm_orchestrator.cli_options import (
    CodeFencesOption,
    ContextWindowOption,
    InputCostOption,
    MaxTokensOption,
    OutputCostOption,
    RequestTimeoutOption,
)
from rlm_orchestrator.cli_run import check_flags, run_local, run_remote
from rlm_orchestrator.cli_support import (
    DebugOption,
    configuration_error,
    read_context,
    run_app,
    show_version,
    state,
    stderr,
)
from rlm_orchestrator.config.backends import BACKENDS
from rlm_orchestrator.config.limits import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITERATIONS
from rlm_orchestrator.config.lm import BACKEND_NAMES
from rlm_orchestrator.journal.cli import journal_app
from rlm_orchestrator.replay_cli import replay
from rlm_orchestrator.telemetry.trace_cli import trace_app
from sandbox_agent.limits import DEFAULT_EXEC_TIMEOUT_SECONDS

# No rich markup: help texts are shown as written ("[default ...]", "[run]" stay).
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
app.add_typer(trace_app, name="trace", help="Read the local trace store (RLM_TRACE_STORE).")
app.add_typer(journal_app, name="journal", help="The durable completions of a journal store.")
app.command()(replay)
# The server's default address (ServerSettings.listen; tests/test_cli_surface.py checks them
# equal): service.settings imports the router, too slow to load for --help.
# The server's default address (ServerSettings.listen; tests/test_cli_surface.py checks both
# equal): service.settings imports the router, too slow a load for --help.
DEFAULT_SERVER_LISTEN = "127.0.0.1:50051"


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=show_version, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """Recursive Language Models: run one here, or serve them over gRPC."""
    state.debug = debug


@app.command()
def run(
    ctx: typer.Context,
    context: Annotated[str, typer.Option("--context", "-c", help="Context file, or - for stdin.")],
    query: Annotated[str, typer.Option("--query", "-q", help="The question (root prompt).")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Root model name (a server's model with --server).", show_default="gpt-4o-mini"
        ),
    ] = None,
    sub_model: Annotated[
        str | None,
        typer.Option(help="Model for llm_query.", show_default="the root model"),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"The LM provider: {', '.join(BACKEND_NAMES)}.", show_default="openai"),
    ] = None,
    api_base: Annotated[
        str | None, typer.Option(help="Base URL of an OpenAI-compatible server.")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="The model's API key (or RLM_RUN_API_KEY; else the provider's variable: "
            "OPENAI_API_KEY, ...). A server of --api-base that takes no key needs none."
        ),
    ] = None,
    environment: Annotated[
        str | None,
        typer.Option(help=f"Sandbox backend: {', '.join(BACKENDS)}.", show_default="local"),
    ] = None,
    exec_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds per code block.", show_default=f"{DEFAULT_EXEC_TIMEOUT_SECONDS:g}"
        ),
    ] = None,
    max_iterations: Annotated[
        int | None,
        typer.Option(help="Turns of the root model.", show_default=str(DEFAULT_MAX_ITERATIONS)),
    ] = None,
    max_depth: Annotated[
        int | None,
        typer.Option(help="Depth of recursive calls.", show_default=str(DEFAULT_MAX_DEPTH)),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Total seconds for the completion.")] = None,
    max_cost: Annotated[
        float | None,
        typer.Option(
            help="Stop when spend exceeds this (USD). A model with no price (none set, none in "
            "litellm's table: a local one) counts as $0: run warns."
        ),
    ] = None,
    input_cost_per_token: InputCostOption = None,
    output_cost_per_token: OutputCostOption = None,
    log_dir: Annotated[Path | None, typer.Option(help="Write a JSONL trajectory log here.")] = None,
    max_tokens: MaxTokensOption = None,
    context_window: ContextWindowOption = None,
    request_timeout: RequestTimeoutOption = None,
    answer_convention: Annotated[
        str | None,
        typer.Option(
            help="How the model answers: final (FINAL / FINAL_VAR) or answer_dict "
            '(answer = {"content": ..., "ready": True}).',
            show_default="final",
        ),
    ] = None,
    code_fences: CodeFencesOption = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Settings file: its [run] table (or RLM_RUN_CONFIG).", show_default="./rlm.toml"
        ),
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="Run on an orchestrator server (HOST:PORT) instead.")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="RLM_SERVER_TOKEN", help="The server's bearer token.")
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA file: connect to the server with TLS.")
    ] = None,
    context_format: Annotated[
        str, typer.Option(help="text, json, or auto (json for *.json).")
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress on stderr.")] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the result as JSON (without the context)."),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Answer QUERY about the CONTEXT file with an RLM. API keys come from the environment
    (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...) and never reach the sandbox. Settings not given
    as flags come from RLM_RUN_* variables and the [run] table of ./rlm.toml; with --server,
    only the flags count (the server's config decides the rest)."""
    from rlm_orchestrator.config.run import load_run_settings
    from rlm_orchestrator.exceptions import ConfigurationError

    flags: dict[str, Any] = {
        "model": model,
        "sub_model": sub_model,
        "backend": backend,
        "api_base": api_base,
        "api_key": api_key,
        "environment": environment,
        "environment_kwargs": {"exec_timeout_seconds": exec_timeout},
        "max_iterations": max_iterations,
        "max_depth": max_depth,
        "timeout_seconds": timeout,
        "max_cost": max_cost,
        "log_dir": log_dir,
        "answer_convention": answer_convention,
        "code_fences": code_fences,
        "input_cost_per_token": input_cost_per_token,
        "output_cost_per_token": output_cost_per_token,
        "max_tokens": max_tokens,
        "context_window": context_window,
        "request_timeout_seconds": request_timeout,
    }
    try:
        token_flag = getattr(ctx.get_parameter_source("token"), "name", "") == "COMMANDLINE"
        check_flags({**flags, "config": config}, server, tls_ca, token_flag)
        settings = load_run_settings(flags, config, read_sources=server is None)
    except ConfigurationError as exc:
        configuration_error(exc)
    loaded = read_context(context, context_format)
    if server is not None:
        # Only what the user said: the server's own defaults (and models) apply otherwise.
        options = {
            "model": model,
            "sub_model": sub_model,
            "max_iterations": max_iterations,
            "max_depth": max_depth,
            "exec_timeout_seconds": exec_timeout,
            "timeout_seconds": timeout,
            "max_cost": max_cost,
            "answer_convention": answer_convention,
            "code_fences": list(settings.code_fences) if code_fences is not None else None,
        }
        run_remote(server, token, tls_ca, loaded, query, options, quiet, as_json)
        return
    if settings.unread_file is not None and not quiet:
        stderr.print(
            f"[dim]note: {settings.unread_file} has no [run] table: not read (run's settings "
            "go under [run]; a server's config is for `serve --config`)[/]"
        )
    run_local(settings, loaded, query, quiet, as_json)


@app.command()
def demo(
    size: Annotated[int, typer.Option(help="Context size in characters.")] = 1_500_000,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress on stderr.")] = False,
) -> None:
    """Offline end-to-end demo: a scripted model drives a real sandbox (see README)."""
    from rlm_orchestrator import RLM
    from rlm_orchestrator.console import EventPrinter
    from rlm_orchestrator.demo import ROOT_MODEL, SUB_MODEL, demo_script, make_context
    from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

    context = make_context(size)
    stderr.print(
        f"[bold]demo:[/] {len(context):,}-character context with one hidden fact; "
        "the model is [bold]scripted[/] (offline), the sandbox and transport are real."
    )
    with ScriptedLMServer(demo_script()) as server:
        common = {"api_base": server.base_url, "api_key": "sk-demo-not-a-real-key"}
        rlm = RLM(
            backend="openai",
            backend_kwargs={"model_name": ROOT_MODEL, **common},
            other_backends=["openai"],
            other_backend_kwargs=[{"model_name": SUB_MODEL, **common}],
            on_event=None if quiet else EventPrinter(stderr),
        )
        result = rlm.completion(context, root_prompt="What is the secret launch code?")
    print(result.response)
    usage = result.usage_summary
    stderr.print(f"[dim]{usage.total_calls} LM calls in {result.execution_time:.1f}s[/]")


@app.command()
def serve(
    listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT (or RLM_SERVER_LISTEN).", show_default=DEFAULT_SERVER_LISTEN),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML config file (or RLM_SERVER_CONFIG).")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Serve the Orchestrator and LMRouter gRPC services until SIGTERM / SIGINT."""
    import asyncio
    import logging

    from rlm_orchestrator import telemetry
    from rlm_orchestrator.exceptions import ConfigurationError
    from rlm_orchestrator.service.listen import AddressInUseError
    from rlm_orchestrator.service.server import serve as run_server
    from rlm_orchestrator.service.settings import load_server_settings

    # Each line names the trace and span it was logged in ("-" outside one).
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s trace_id=%(trace_id)s span_id=%(span_id)s "
        "%(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(telemetry.TraceContextFilter())
    try:
        settings = load_server_settings(config, listen=listen)
    except (ConfigurationError, ValueError) as exc:
        configuration_error(exc)
    try:
        asyncio.run(run_server(settings))
    except ConfigurationError as exc:
        configuration_error(exc)
    except AddressInUseError as exc:
        stderr.print("[bold red]error:[/]", escape(exc.strerror or str(exc)), soft_wrap=True)
        raise typer.Exit(1) from None
    # Every sandbox is released and the server stopped: skip the interpreter's teardown of
    # litellm's module graph (~1.2 s here), which would stretch the shutdown past its grace.
    telemetry.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def ui(
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            help="The SQLite trace store (default: env RLM_TRACE_STORE, "
            "else ~/.local/share/rlm-orchestrator/traces.db).",
            show_default=False,
        ),
    ] = None,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT; beyond loopback only with a token (RLM_UI_TOKEN).")
    ] = "127.0.0.1:8765",
) -> None:
    """A web page of the recorded completions: turns, timeline, sub-calls, totals (live)."""
    import asyncio

    from rlm_orchestrator.exceptions import ConfigurationError
    from rlm_orchestrator.telemetry.store import store_path
    from rlm_orchestrator.ui.command import run_viewer

    try:
        asyncio.run(run_viewer(store_path(store), listen))
    except ConfigurationError as exc:
        configuration_error(exc)
    except OSError as exc:
        stderr.print("[bold red]error:[/]", escape(f"cannot listen on {listen}: {exc}"))
        raise typer.Exit(1) from None


def main() -> None:
    """The console entry point (cli_support.run_app: one line per error, the fast exit). Not
    in `app` itself: CliRunner tests call that."""
    run_app(app)


if __name__ == "__main__":
    main()
