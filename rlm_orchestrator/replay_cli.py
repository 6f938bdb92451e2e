"""`rlm-orchestrator replay`: run a recorded completion's code again in a fresh sandbox, of any
backend, with the recorded model answers, and say block by block where it differs.

Exit codes: 0 no divergence, 1 a divergence (or a failure at run time), 2 a usage or
configuration error (journal/rerun.py does the work; journal/recording.py reads the sources).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from rlm_orchestrator.cli_support import (
    DebugOption,
    configuration_error,
    read_context,
    stderr,
    usage_error,
)
from rlm_orchestrator.config.backends import BACKENDS

if TYPE_CHECKING:
    from rlm_orchestrator.config.sandbox import SandboxConfig
    from rlm_orchestrator.journal.recording import Recording
    from rlm_orchestrator.journal.rerun import ReplayReport
    from rlm_orchestrator.journal.store import JournalStore

DIVERGED = 1


async def open_journal(address: str) -> JournalStore:
    """The journal store at `address` (sqlite:///dir, postgresql://...), opened."""
    from rlm_orchestrator.config.errors import refusing
    from rlm_orchestrator.config.journal import JournalSettings, open_store
    from rlm_orchestrator.exceptions import ConfigurationError

    with refusing(lambda loc: "--journal"):
        settings = JournalSettings(store=address)
    if settings.kind == "sqlite":
        from rlm_orchestrator.journal.sqlite import FILE_NAME

        # Opening one makes it: a mistyped directory is said, not made.
        if not await asyncio.to_thread((settings.directory / FILE_NAME).is_file):
            raise ConfigurationError(f"--journal {address}: no journal there")
    return await open_store(settings)


def replay(
    source: Annotated[
        str,
        typer.Argument(
            help="A trajectory log (a JSONL file of `run --log-dir`), or a completion id of "
            "the journal (--journal).",
            show_default=False,
        ),
    ],
    environment: Annotated[
        str | None,
        typer.Option(
            help=f"Sandbox backend to replay in: {', '.join(BACKENDS)}.",
            show_default="the recorded one",
        ),
    ] = None,
    environment_kwargs: Annotated[
        str | None,
        typer.Option(
            help='The sandbox\'s keys as a JSON object ({"image": "..."}), over the recorded '
            "ones: the backend's own when it is the recorded backend, else the limits only.",
        ),
    ] = None,
    journal: Annotated[
        str | None,
        typer.Option(
            help="The journal store holding the completion (sqlite:///dir, postgresql://...).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="The config of the server that ran the completion: its [journal] store (unless "
            "--journal) and its sandbox (environment, environment_kwargs) are the replay's.",
        ),
    ] = None,
    context: Annotated[
        str | None,
        typer.Option(
            "--context",
            "-c",
            help="The context file, or - for stdin: needed for a trajectory (it holds only the "
            "context's shape), else it replaces the recorded one.",
        ),
    ] = None,
    context_format: Annotated[
        str, typer.Option(help="text, json, or auto (json for *.json).")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    debug: DebugOption = False,
) -> None:
    """Run a recorded completion's code again in a fresh sandbox with the recorded model
    answers (no model call, no key needed) and report where the outputs differ, block by
    block. Exit code 0: no divergence; 1: a divergence; 2: a usage or configuration error."""
    from rlm_orchestrator.exceptions import ConfigurationError, RLMError
    from rlm_orchestrator.journal.recording import RecordingError

    extra = _json_object(environment_kwargs)
    try:
        if config is not None:
            journal = _server_config(config, journal)
        recording = _read(source, journal)
        if config is not None and journal is not None:
            _server_sandbox(recording, config)
        given = read_context(context, context_format) if context is not None else None
        loaded = _context(recording, given, context is not None)
        sandbox, setup_code = _sandbox(recording, environment, extra)
        report = asyncio.run(_rerun(recording, sandbox, setup_code, loaded))
    except (ConfigurationError, RecordingError) as exc:
        configuration_error(exc)
    except RLMError as exc:
        stderr.print(f"[bold red]error:[/] {escape(f'{type(exc).__name__}: {exc}')}")
        raise typer.Exit(1) from None
    _print(report, as_json)
    if report.diverged:
        raise typer.Exit(DIVERGED)


def _json_object(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        usage_error(f"--environment-kwargs: not valid JSON: {exc}")
    if not isinstance(value, dict):
        usage_error("--environment-kwargs: must be a JSON object")
    return value


def _server_table(config: Path) -> dict[str, Any]:
    from rlm_orchestrator.config.loading import read_toml

    return read_toml(config)


def _server_config(config: Path, journal: str | None) -> str:
    """The journal store of a server config (--journal first)."""
    from rlm_orchestrator.exceptions import ConfigurationError

    if journal is not None:
        return journal
    table = _server_table(config).get("journal")
    if not isinstance(table, dict) or not isinstance(table.get("store"), str):
        raise ConfigurationError(f"{config} has no [journal] store (or give --journal)")
    return str(table["store"])


def _server_sandbox(recording: Recording, config: Path) -> None:
    """What the server ran its completions in (not in the journal): its backend and keys, the
    request's own limits over them."""
    table = _server_table(config)
    kwargs = dict(table.get("environment_kwargs") or {})
    # A request that set no exec timeout had the server's default (else its ceiling).
    for key in ("default_exec_timeout_seconds", "exec_timeout_seconds"):
        if table.get(key) is not None:
            kwargs.setdefault("exec_timeout_seconds", table[key])
    recording.environment = str(table.get("environment") or "local")
    recording.environment_kwargs = {**kwargs, **recording.environment_kwargs}


def _read(source: str, journal: str | None) -> Recording:
    from rlm_orchestrator.exceptions import ConfigurationError
    from rlm_orchestrator.journal.recording import read_trajectory

    path = Path(source)
    if journal is not None:
        return asyncio.run(_read_journal(journal, source))
    if not path.is_file():
        raise ConfigurationError(
            f"{source}: no such trajectory file (a completion id needs --journal STORE)"
        )
    return read_trajectory(path)


async def _read_journal(journal: str, source: str) -> Recording:
    from rlm_orchestrator.journal.recording import read_journal

    store = await open_journal(journal)
    try:
        return await read_journal(store, source)
    finally:
        await store.close()


def _context(recording: Recording, given: Any, was_given: bool) -> Any:
    from rlm_orchestrator.exceptions import ConfigurationError
    from rlm_orchestrator.prompts import build_initial_messages

    if not was_given:
        if not recording.has_context:
            raise ConfigurationError(
                f"{recording.source} does not hold its context: give it with --context FILE"
            )
        return recording.context
    shape = build_initial_messages("", given)[1]["content"]
    if recording.context_shape is not None and shape != recording.context_shape:
        raise ConfigurationError(
            f"--context is not the context of {recording.source}: the model was told "
            f"{recording.context_shape!r}, this one is {shape!r}"
        )
    return given


def _sandbox(
    recording: Recording, environment: str | None, extra: dict[str, Any]
) -> tuple[SandboxConfig, str | None]:
    """The recorded sandbox's keys (all of them on its own backend, else its limits), the
    flags' over them."""
    from rlm_orchestrator.config.errors import refusing
    from rlm_orchestrator.config.sandbox import LIMIT_KEYS, rlm_environment

    backend = environment or recording.environment
    recorded = dict(recording.environment_kwargs)
    if backend != recording.environment:
        recorded = {k: v for k, v in recorded.items() if k in LIMIT_KEYS}
    kwargs = {**recorded, **extra}
    with refusing(lambda loc: "--environment" if loc == ("environment",) else _key(loc)):
        config, setup_code = rlm_environment(backend, kwargs)
    return config, setup_code if setup_code is not None else recording.setup_code


def _key(loc: tuple[int | str, ...]) -> str:
    return "--environment-kwargs " + ".".join(str(part) for part in loc[1:])


async def _rerun(
    recording: Recording, config: SandboxConfig, setup_code: str | None, context: Any
) -> ReplayReport:
    from rlm_orchestrator.journal.rerun import rerun

    return await rerun(recording, config, setup_code, context)


def _print(report: ReplayReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(
        f"replay of {report.source} in a fresh {report.environment} sandbox "
        "(sub-calls answered from the record)"
    )
    for block in report.blocks:
        if block.skipped:
            print(f"{block.label}: {block.skipped}")
            continue
        print(f"{block.label}: {'DIFFERS' if block.diverged else 'same'}")
        for difference in block.differences:
            print(f"  {difference.what}: {difference.detail}")
        for note in block.notes:
            print(f"  note: {note}")
    print(report.summary())
