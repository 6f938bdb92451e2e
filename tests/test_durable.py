"""Durable completions through `serve` (issue 20): kill -9 of the server mid-completion, a new
server on the same journal finishes it, nothing paid twice, and a client re-attached by id gets
every event once, in order.

The servers are real subprocesses with a journal store (SQLite in a temp dir, or a private
PostgreSQL server for two replicas); the models are the scripted server of this process, whose
request log outlives the servers.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT_MODEL,
    SANDBOX_IMAGE,
    SUB_MODEL,
    ServerProcess,
    repl,
    require_docker,
    server_config,
    start_server,
    stop_server,
)
from postgres_support import postgres_dsn, postgres_server  # noqa: F401  (fixtures)

from rlm_orchestrator import events as ev
from rlm_orchestrator.config.journal import JournalSettings, open_store
from rlm_orchestrator.exceptions import ClientError
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

LEASE_SECONDS = 2.0
TURNS = [
    repl("a = llm_query('the fact')\nprint('got', a)"),
    # The block the server is killed in: it runs again, as a whole, on the new server.
    repl("import time\nb = a.upper()\ntime.sleep(3)\nprint('slept')"),
    repl("c = b + '!'\nprint(c)"),
    "FINAL_VAR(c)",
]


def durable_config(lm: ScriptedLMServer, directory: Path, store: str, environment: str) -> Path:
    config = server_config(lm, directory, environment=environment, shutdown_grace_seconds=0.5)
    with config.open("a") as toml:
        toml.write(f'[journal]\nstore = "{store}"\nlease_seconds = {LEASE_SECONDS}\n')
        if environment == "docker":
            toml.write(f'[environment_kwargs]\nimage = "{SANDBOX_IMAGE}"\n')
    return config


def killed_mid_block(
    server: ServerProcess, terminate: bool = False
) -> tuple[str, list[ev.StreamEvent]]:
    """Start the completion; kill -9 the server (or SIGTERM it: a redeploy) once the second
    turn's block runs. The id and the events the client received before the cut."""
    received: list[ev.StreamEvent] = []
    with server.client() as client:
        try:
            for event in client.stream("ctx", "What is the fact, shouted?"):
                received.append(event)
                if isinstance(event, ev.CodeBlockStarted) and event.iteration == 2:
                    time.sleep(0.5)  # inside its sleep
                    if terminate:
                        server.process.terminate()
                    else:
                        server.process.kill()
                    server.process.wait()
        except ClientError:
            pass  # the stream is cut with the server
    started = received[0]
    assert isinstance(started, ev.CompletionStarted)
    return started.completion_id, received


def attached_on(server: ServerProcess, completion_id: str, after: int) -> list[ev.StreamEvent]:
    """What a client re-attached to `server` gets after the `after`-th event; the server is
    stopped afterwards."""
    try:
        with server.client() as client:
            return list(client.attach(completion_id, after_event=after))
    finally:
        stop_server(server)


def finished_undisturbed(
    lm: ScriptedLMServer, after: list[ev.StreamEvent]
) -> ev.CompletionFinished:
    """The completion ended with the undisturbed run's answer, and no model was asked twice:
    4 root turns, 1 sub-call."""
    finished = after[-1]
    assert isinstance(finished, ev.CompletionFinished), after[-3:]
    assert finished.result.response == "THE SKY IS BLUE!"
    assert len(lm.requests_for(ROOT_MODEL)) == 4
    assert len(lm.requests_for(SUB_MODEL)) == 1
    return finished


@pytest.mark.parametrize("environment", ["local", "docker"])
def test_a_completion_outlives_a_killed_server(
    lm: ScriptedLMServer, tmp_path: Path, environment: str
) -> None:
    if environment == "docker":
        require_docker()
    lm.set_sequence(ROOT_MODEL, TURNS)
    lm.set_sequence(SUB_MODEL, ["the sky is blue"])
    store = f"sqlite://{tmp_path / 'journal'}"
    config = durable_config(lm, tmp_path, store, environment)
    first = start_server(config)
    try:
        completion_id, before = killed_mid_block(first)
    finally:
        stop_server(first)
    assert not any(isinstance(e, ev.CompletionFinished) for e in before)
    after = attached_on(start_server(config), completion_id, len(before))
    finished = finished_undisturbed(lm, after)
    # Every event once, in order: the journal holds 1..N without a gap, and the client got
    # exactly those (before the cut, then after it).
    offsets = journal_offsets(tmp_path / "journal", completion_id)
    assert offsets == list(range(1, len(offsets) + 1))
    assert len(before) + len(after) == len(offsets)
    # The usage is the undisturbed run's: each call counted once.
    usage = finished.result.usage_summary.model_usage_summaries
    assert usage[ROOT_MODEL].total_calls == 4 and usage[SUB_MODEL].total_calls == 1


def journal_offsets(directory: Path, completion_id: str) -> list[int]:
    """The event offsets the journal holds, read through its store."""

    async def read() -> list[int]:
        store = await open_store(JournalSettings(store=f"sqlite://{directory}"))
        try:
            return [e.offset for e in await store.events(completion_id, 0, 100_000)]
        finally:
            await store.close()

    return asyncio.run(read())


def test_attach_to_an_unknown_completion_is_not_found(lm: ScriptedLMServer, tmp_path: Path) -> None:
    config = durable_config(lm, tmp_path, f"sqlite://{tmp_path / 'journal'}", "local")
    server = start_server(config)
    try:
        with server.client() as client, pytest.raises(ClientError, match="no completion"):
            list(client.attach("nope"))
    finally:
        stop_server(server)


def test_a_replica_takes_over_when_the_other_dies(
    lm: ScriptedLMServer,
    tmp_path: Path,
    postgres_dsn: str,  # noqa: F811  (the fixture)
) -> None:
    """Two servers on one PostgreSQL journal: the one running the completion is killed, the
    other takes it over once its lease expires, and finishes it."""
    lm.set_sequence(ROOT_MODEL, TURNS)
    lm.set_sequence(SUB_MODEL, ["the sky is blue"])
    config = durable_config(lm, tmp_path, postgres_dsn, "local")
    survivor = start_server(config)
    try:
        doomed = start_server(config)
        try:
            completion_id, before = killed_mid_block(doomed)
        finally:
            stop_server(doomed)
    except BaseException:
        stop_server(survivor)
        raise
    finished_undisturbed(lm, attached_on(survivor, completion_id, len(before)))


def test_a_server_shut_down_hands_its_completion_over(lm: ScriptedLMServer, tmp_path: Path) -> None:
    """SIGTERM (a redeploy): after its grace, the server gives the unfinished completion up
    rather than failing it; the next server resumes it at once (no lease to wait for)."""
    lm.set_sequence(ROOT_MODEL, TURNS)
    lm.set_sequence(SUB_MODEL, ["the sky is blue"])
    config = durable_config(lm, tmp_path, f"sqlite://{tmp_path / 'journal'}", "local")
    first = start_server(config)
    try:
        completion_id, before = killed_mid_block(first, terminate=True)
    finally:
        stop_server(first)
    assert not any(isinstance(e, ev.CompletionFailed) for e in before), before[-1]
    finished_undisturbed(lm, attached_on(start_server(config), completion_id, len(before)))


def test_the_journal_command_lists_deletes_and_prunes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rlm_orchestrator.cli import app
    from rlm_orchestrator.journal.store import CompletionRecord

    store = f"sqlite://{tmp_path / 'journal'}"

    async def fill() -> None:
        opened = await open_store(JournalSettings(store=store))
        try:
            for name in ("kept", "gone", "old"):
                await opened.begin(CompletionRecord(name, {"root_prompt": "?"}, tenant="t"))
            await opened.end("old", "finished", {"state": "finished"})
        finally:
            await opened.close()

    asyncio.run(fill())
    runner = CliRunner()
    listed = runner.invoke(app, ["journal", "list", "--store", store, "--json"])
    assert listed.exit_code == 0, listed.output
    assert {r["completion_id"] for r in json.loads(listed.stdout)} == {"kept", "gone", "old"}
    assert runner.invoke(app, ["journal", "delete", "gone", "--store", store]).exit_code == 0
    assert runner.invoke(app, ["journal", "delete", "gone", "--store", store]).exit_code == 1
    pruned = runner.invoke(app, ["journal", "prune", "--store", store, "--max-bytes", "1"])
    assert pruned.exit_code == 0 and "1 completion(s) deleted" in pruned.stdout
    listed = runner.invoke(app, ["journal", "list", "--store", store, "--json"])
    assert [r["completion_id"] for r in json.loads(listed.stdout)] == ["kept"]  # running stays
