"""`rlm-orchestrator journal`: the durable completions a journal store holds (list, delete,
prune by the retention settings). The store is `--store` or the server config's [journal]."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

journal_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None
)
T = TypeVar("T")

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="sqlite:///a/directory or postgresql://... (default: the [journal] of --config).",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="A server config file with a [journal] table.")
]


def _settings(store: str | None, config: Path | None) -> Any:
    from rlm_orchestrator.config.journal import JournalSettings
    from rlm_orchestrator.config.loading import read_toml

    if store is not None:
        return JournalSettings(store=store)
    if config is None:
        raise typer.BadParameter("give --store or --config (a server config with [journal])")
    table = read_toml(config).get("journal")
    if not isinstance(table, dict):
        raise typer.BadParameter(f"{config} has no [journal] table")
    return JournalSettings.model_validate(table)


def _with_store(store: str | None, config: Path | None, use: Callable[[Any], Awaitable[T]]) -> T:
    from rlm_orchestrator.config.journal import open_store

    settings = _settings(store, config)

    async def run() -> T:
        opened = await open_store(settings)
        try:
            return await use(opened)
        finally:
            await opened.close()

    return asyncio.run(run())


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


@journal_app.command("list")
def list_completions(
    store: StoreOption = None,
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="running, finished, failed, cancelled.")] = None,
    limit: int = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """The newest journaled completions."""
    records = _with_store(store, config, lambda s: s.find(state=state, limit=limit))
    if as_json:
        rows = [
            {
                "completion_id": r.completion_id,
                "state": r.state,
                "tenant": r.tenant,
                "owner": r.owner,
                "created_at": r.created_at,
                "size_bytes": r.size_bytes,
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return
    out = Console(highlight=False)
    for r in records:
        out.print(
            f"{r.completion_id}  {r.state:<9}  {_when(r.created_at)}  {r.size_bytes:>9} B  "
            f"{escape(r.tenant)}"
        )


@journal_app.command()
def delete(
    completion_id: Annotated[str, typer.Argument(help="The completion to delete.")],
    store: StoreOption = None,
    config: ConfigOption = None,
) -> None:
    """Delete one completion's journal (its entries, events and unshared blobs)."""
    if not _with_store(store, config, lambda s: s.delete(completion_id)):
        Console(stderr=True).print(f"[red]error:[/] no completion {escape(completion_id)}")
        raise typer.Exit(1)


@journal_app.command()
def prune(
    store: StoreOption = None,
    config: ConfigOption = None,
    max_age_days: Annotated[float | None, typer.Option(help="Ended ones older than this.")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="Then the oldest, down to this.")] = None,
) -> None:
    """Delete ended completions by age and size (default: the store's retention settings)."""
    settings = _settings(store, config)
    age = max_age_days * 86400 if max_age_days is not None else settings.max_age_seconds
    size = max_bytes if max_bytes is not None else settings.max_bytes
    deleted = _with_store(store, config, lambda s: s.prune(max_age_seconds=age, max_bytes=size))
    print(f"{deleted} completion(s) deleted")
