"""`rlm-orchestrator replay` (issue 20, acceptance 5): a completion recorded with local sandboxes
runs again in Docker sandboxes with the recorded answers, without a model call, and reports no
divergence for deterministic code; a block that prints the clock diverges, reported by its
number. The same from a journal store (the in-memory one, its entries written by the
completion recorder).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT_MODEL, SANDBOX_IMAGE, SUB_MODEL, backend_kwargs, repl, require_docker
from typer.testing import CliRunner

from rlm_orchestrator import RLM, RLMLogger, answer_dict, replay_cli
from rlm_orchestrator.cli import app
from rlm_orchestrator.journal.memory import MemoryJournalStore
from rlm_orchestrator.journal.recorder import CompletionJournal
from rlm_orchestrator.journal.replay import BlockRecord, SubCallRecord
from rlm_orchestrator.journal.store import CompletionRecord
from rlm_orchestrator.sandbox import ExecutionReport, SubCallOutcome
from rlm_orchestrator.testing.scripted_lm import Rule, ScriptedLMServer

CONTEXT = "alpha beta gamma delta"
DETERMINISTIC = [
    repl("a = llm_query('first fact')\nwords = context.split()\nprint(a, len(words))"),
    repl("import random\nrandom.seed(7)\nb = round(random.random(), 6)\nprint(b, words[::-1])"),
    repl("e = llm_query_batched(['x', 'y'])\nprint(e, a.upper())\nprint(undefined_name)"),
    repl("r = rlm_query('z')\nimport zlib\nprint(zlib.crc32(repr((a, b, e, r)).encode()))"),
]
CLOCK = repl("import time\nstamp = time.time()\nprint(stamp)")
DOCKER = json.dumps({"image": SANDBOX_IMAGE})


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["replay", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def record(lm: ScriptedLMServer, directory: Path, blocks: list[str], **kwargs: Any) -> Path:
    """A completion run with local sandboxes, logged: its trajectory file."""
    for prompt, answer in (("first fact", "one"), ("x", "x1"), ("y", "y1"), ("z", "z1")):
        lm.add_rule(Rule(answer, model=SUB_MODEL, regex=f"^{prompt}$"))
    lm.set_sequence(ROOT_MODEL, [*blocks, kwargs.pop("last", "FINAL(done)")])
    logger = RLMLogger(directory / "logs")
    rlm = RLM(
        backend="openai",
        backend_kwargs=backend_kwargs(lm, ROOT_MODEL),
        other_backends=["openai"],
        other_backend_kwargs=[backend_kwargs(lm, SUB_MODEL)],
        environment="local",
        environment_kwargs={"setup_code": "seeded = 42"},
        logger=logger,
        **kwargs,
    )
    assert rlm.completion(CONTEXT).response == "done"
    return Path(logger.log_file_path)


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text(CONTEXT)
    return path


def test_a_local_trajectory_replays_in_docker_without_divergence(
    lm: ScriptedLMServer, tmp_path: Path, context_file: Path
) -> None:
    require_docker()
    trajectory = record(lm, tmp_path, [*DETERMINISTIC, repl("print(seeded)")])
    calls = len(lm.requests)
    code, stdout, stderr = invoke(
        str(trajectory), "--context", str(context_file), "--environment", "docker",
        "--environment-kwargs", DOCKER,
    )  # fmt: skip
    assert code == 0, stdout + stderr
    assert "in a fresh docker sandbox" in stdout
    for number in range(1, 6):
        assert f"block {number} (turn {number}, block 1): same" in stdout
    assert stdout.strip().endswith("no divergence: 5 block(s) replayed the same")
    assert len(lm.requests) == calls  # every answer came from the record


def test_a_block_that_reads_the_clock_diverges_by_its_number(
    lm: ScriptedLMServer, tmp_path: Path, context_file: Path
) -> None:
    trajectory = record(lm, tmp_path, [DETERMINISTIC[0], CLOCK, repl("print(a)")])
    code, stdout, _ = invoke(str(trajectory), "--context", str(context_file))
    assert code == 1
    assert "block 1 (turn 1, block 1): same" in stdout
    assert "block 2 (turn 2, block 1): DIFFERS\n  stdout: at character" in stdout
    assert "block 3 (turn 3, block 1): same" in stdout
    assert "divergence: 1 of 3 block(s) differ, the first at block 2 (turn 2, block 1)" in stdout
    code, stdout, _ = invoke(str(trajectory), "--context", str(context_file), "--json")
    assert code == 1
    report = json.loads(stdout)
    assert report["diverged"] is True
    assert [b["number"] for b in report["blocks"] if b["differences"]] == [2]
    assert report["blocks"][1]["differences"][0]["what"] == "stdout"


def test_answer_dicts_code_is_run_as_the_loop_runs_it(
    lm: ScriptedLMServer, tmp_path: Path, context_file: Path
) -> None:
    blocks = [
        repl("answer['content'] = 'draft'\nprint(type(answer).__name__, answer['ready'])"),
        repl("answer = {'content': 'x'}\nprint(sorted(answer))"),
        repl("print(type(answer).__name__, answer['content'])\nanswer['content'] = 'done'"),
    ]
    last = repl("answer['ready'] = True")
    trajectory = record(lm, tmp_path, blocks, last=last, answer_convention="answer_dict")
    code, stdout, _ = invoke(str(trajectory), "--context", str(context_file))
    assert code == 0, stdout
    assert "no divergence: 4 block(s) replayed the same" in stdout


def test_changed_code_is_reported_as_requests_not_in_the_record(
    lm: ScriptedLMServer, tmp_path: Path, context_file: Path
) -> None:
    trajectory = record(lm, tmp_path, [DETERMINISTIC[0]])
    lines = trajectory.read_text().splitlines()
    turn = json.loads(lines[1])
    turn["code_blocks"][0]["code"] = turn["code_blocks"][0]["code"].replace("first", "second")
    trajectory.write_text("\n".join([lines[0], json.dumps(turn), *lines[2:]]) + "\n")
    calls = len(lm.requests)
    code, stdout, _ = invoke(str(trajectory), "--context", str(context_file))
    assert code == 1
    assert "sub_call: a llm_query request not in the record: 'second fact'" in stdout
    assert "note: 1 recorded sub-call answer(s) were not asked for" in stdout
    assert len(lm.requests) == calls


def test_usage_errors(lm: ScriptedLMServer, tmp_path: Path, context_file: Path) -> None:
    trajectory = record(lm, tmp_path, [DETERMINISTIC[0]])
    code, _, stderr = invoke(str(trajectory))
    assert code == 2 and "does not hold its context: give it with --context" in stderr
    other = tmp_path / "other.txt"
    other.write_text("not the same context")
    code, _, stderr = invoke(str(trajectory), "--context", str(other))
    assert code == 2 and "--context is not the context of trajectory" in stderr
    code, _, stderr = invoke(str(tmp_path / "missing.jsonl"))
    assert code == 2 and "no such trajectory file" in stderr
    code, _, stderr = invoke(str(trajectory), "-c", str(context_file), "--environment", "nope")
    assert code == 2 and "--environment" in stderr
    args = ("-c", str(context_file), "--environment-kwargs", '{"bogus": 1}')
    code, _, stderr = invoke(str(trajectory), *args)
    assert code == 2 and "--environment-kwargs bogus" in stderr


# -- from a journal ------------------------------------------------------------------------


def report(stdout: str, stderr: str = "", status: str = "ok") -> ExecutionReport:
    return ExecutionReport(status=status, stdout=stdout, stderr=stderr, error="")


async def journaled(store: MemoryJournalStore, completion_id: str, context: Any) -> None:
    """A completion journaled under answer_dict: the context as a blob, two model blocks (the
    first with a sub-call), then one that read the clock. A text context's journal holds
    answer_dict's code as an internal block; a JSON one's says the convention in its options
    (as serve journals it), and the replay runs that code as the loop does."""
    encoding = "text" if isinstance(context, str) else "json"
    data = context.encode() if isinstance(context, str) else json.dumps(context).encode()
    blob = await store.put_blob(completion_id, data)
    options = {} if encoding == "text" else {"answerConvention": "answer_dict"}
    request = {"context_blob": blob, "context_encoding": encoding, "options": options}
    await store.begin(CompletionRecord(completion_id, request))
    journal = CompletionJournal(store, completion_id)
    if encoding == "text":
        install = BlockRecord(answer_dict.INSTALL_CODE, internal=True).finish(report(""))
        await journal.block(0, 0, install)
    first = BlockRecord("a = llm_query('first fact')\nprint(a, len(context))")
    answers = [SubCallOutcome(text="one")]
    sub_call = SubCallRecord.of(["first fact"], "", "llm_query", answers)
    first.sub_calls.append(sub_call)
    await journal.sub_call(1, 0, sub_call)
    await journal.block(1, 0, first.finish(report(f"one {len(context)}\n")))
    second = BlockRecord("answer['content'] = a * 2\nprint(answer['content'])")
    await journal.block(2, 0, second.finish(report("oneone\n")))
    clock = BlockRecord("import time\nprint(time.time())")
    await journal.block(3, 0, clock.finish(report("1700000000.0\n")))
    await store.end(completion_id, "finished", {"response": "done"})


@pytest.mark.parametrize(
    ("context", "environment"), [("a text context", "local"), ({"rows": [1, 2, 3]}, "docker")]
)
def test_a_journaled_completion_replays_from_the_store(
    monkeypatch: pytest.MonkeyPatch, context: Any, environment: str
) -> None:
    if environment == "docker":
        require_docker()
    store = MemoryJournalStore()
    asyncio.run(journaled(store, "c-1", context))

    async def the_store(address: str) -> MemoryJournalStore:
        assert address == "memory:test"
        return store

    monkeypatch.setattr(replay_cli, "open_journal", the_store)
    args = ("--environment", environment, "--environment-kwargs", DOCKER)
    code, stdout, stderr = invoke(
        "c-1", "--journal", "memory:test", *args[: 4 if environment == "docker" else 2]
    )
    assert code == 1, stdout + stderr
    assert f"replay of completion c-1 in a fresh {environment} sandbox" in stdout
    assert ("internal code (answer_dict): same" in stdout) == isinstance(context, str)
    assert "block 1 (turn 1, block 1): same" in stdout
    assert "block 2 (turn 2, block 1): same" in stdout
    assert "block 3 (turn 3, block 1): DIFFERS\n  stdout: at character " in stdout
    ran = 4 if isinstance(context, str) else 3
    assert (
        f"divergence: 1 of {ran} block(s) differ, the first at block 3 (turn 3, block 1)" in stdout
    )
    code, _, stderr = invoke("c-2", "--journal", "memory:test")
    assert code == 2 and "no completion 'c-2' in the journal" in stderr


def test_a_journal_that_is_not_there_is_not_made(tmp_path: Path) -> None:
    code, _, stderr = invoke("c-1", "--journal", f"sqlite://{tmp_path / 'typo'}")
    assert code == 2 and "no journal there" in stderr
    assert not (tmp_path / "typo").exists()
    code, _, stderr = invoke("c-1", "--journal", "mysql://host/db")
    assert code == 2 and "--journal: a journal store is" in stderr


def test_a_completion_journaled_by_serve_and_resumed_replays_without_divergence(
    lm: ScriptedLMServer, tmp_path: Path
) -> None:
    """Recorded by `serve` with local sandboxes, killed mid-block and finished by a second
    server (which journaled the blocks it ran again): replayed from the SQLite journal in
    Docker, each block once, the same."""
    require_docker()
    from conftest import start_server, stop_server
    from test_durable import TURNS, durable_config, killed_mid_block

    lm.set_sequence(ROOT_MODEL, TURNS)
    lm.set_sequence(SUB_MODEL, ["the sky is blue"])
    store = f"sqlite://{tmp_path / 'journal'}"
    config = durable_config(lm, tmp_path, store, "local")
    first = start_server(config)
    try:
        completion_id, _ = killed_mid_block(first)
    finally:
        stop_server(first)
    second = start_server(config)
    try:
        with second.client() as client:
            assert list(client.attach(completion_id))[-1].result.response == "THE SKY IS BLUE!"
    finally:
        stop_server(second)
    calls = len(lm.requests)
    # A server config gives the store and the sandbox (here a Docker one's, as if it had run
    # the completion in Docker).
    in_docker = durable_config(lm, tmp_path, store, "docker")
    code, stdout, stderr = invoke(completion_id, "--config", str(in_docker))
    assert code == 0, stdout + stderr
    assert "in a fresh docker sandbox" in stdout
    for turn in (1, 2, 3):
        assert f"block {turn} (turn {turn}, block 1): same" in stdout
    assert stdout.strip().endswith("no divergence: 3 block(s) replayed the same")
    # Without it, the journal alone: a local sandbox.
    code, stdout, stderr = invoke(completion_id, "--journal", store)
    assert code == 0, stdout + stderr
    assert "in a fresh local sandbox" in stdout and "no divergence: 3 block(s)" in stdout
    assert len(lm.requests) == calls
