"""Child RLMs: `rlm_query_batched` of 16 children against one `rlm_query` child alone.

One `rlm-orchestrator serve` subprocess (local sandboxes), the scripted LM answering every
call after 50 ms (as in `scale`). A completion at max_depth 2 runs one code block that times,
where it runs, in alternation (the same machine load for both): `rlm_query(p)`, one child
alone, and `rlm_query_batched([p] * 16)`. Each child is a whole RLM in its own sandbox: turn 1
runs ```` ```repl ```` `y = llm_query('leaf')`, turn 2 answers `FINAL_VAR(y)`, so a child costs
a sandbox start and three LM calls (150 ms). Ideal: 16 children take as long as one.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from bench import server
from bench.common import Metric, timing
from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, Script, ScriptedLMServer

NAME = "recursion"
DESCRIPTION = "rlm_query_batched of 16 children (one llm_query each) vs one rlm_query child"
CHILDREN = 16
WARMUP = 1
ROUNDS = 4  # a round is ~5 s on 2 cores today (17 sandbox starts)
LM_DELAY = 0.05
FIRST_TURN_MESSAGES = 3  # system prompt, context metadata, the turn's user prompt
CHILD_PROMPT = "child task"
LEAF_PROMPT = "leaf question"
LEAF_ANSWER = "leaf answer"
ANSWER_VARIABLE = "_bench_result"

# The root's one block: timings where the calls are made, in a JSON string it then answers.
MEASURE = f"""```repl
import time as _t, json as _j
_one, _all, _bad = [], [], []
for _i in range({WARMUP + ROUNDS}):
    _s = _t.perf_counter()
    _a = rlm_query({CHILD_PROMPT!r})
    _e = _t.perf_counter() - _s
    if _a != {LEAF_ANSWER!r}:
        _bad.append(_a)
    if _i >= {WARMUP}:
        _one.append(_e)
    _s = _t.perf_counter()
    _b = rlm_query_batched([{CHILD_PROMPT!r}] * {CHILDREN})
    _e = _t.perf_counter() - _s
    _bad.extend(x for x in _b if x != {LEAF_ANSWER!r})
    if len(_b) != {CHILDREN}:
        _bad.append(f"{{len(_b)}} answers")
    if _i >= {WARMUP}:
        _all.append(_e)
{ANSWER_VARIABLE} = _j.dumps({{"one": _one, "all": _all, "bad": _bad[:3]}})
```"""
CHILD_TURN = f"```repl\ny = llm_query({LEAF_PROMPT!r})\n```"


def _root(request: RecordedRequest) -> str:
    if len(request.messages) == FIRST_TURN_MESSAGES:
        return MEASURE
    return f"FINAL_VAR({ANSWER_VARIABLE})"


def _sub(request: RecordedRequest) -> str:
    """The children's root model, and the model of their `llm_query`."""
    if request.last_user_message == LEAF_PROMPT:
        return LEAF_ANSWER
    if len(request.messages) == FIRST_TURN_MESSAGES:
        return CHILD_TURN
    return "FINAL_VAR(y)"


async def _measure() -> tuple[list[float], list[float], int]:
    script = Script(
        rules=[
            Rule(_root, model="root", delay_seconds=LM_DELAY),
            Rule(_sub, model="sub", delay_seconds=LM_DELAY),
        ]
    )
    with ScriptedLMServer(script) as lm, tempfile.TemporaryDirectory() as tmp:
        config = server.config(lm.base_url, Path(tmp), 4 * CHILDREN, NAME, "max_depth = 2")
        process, target = await asyncio.to_thread(server.start, config)
        try:
            async with AsyncClient(target) as client:
                result = await client.completion(
                    "the parent's context",
                    max_depth=2,
                    timeout_seconds=900.0,
                    exec_timeout_seconds=300.0,
                )
            calls = len(lm.requests)
        finally:
            await asyncio.to_thread(server.stop, process)
    try:
        found = json.loads(result.response)
    except ValueError:
        raise RuntimeError(f"the measuring block failed: {result.response[:500]}") from None
    if found["bad"]:
        raise RuntimeError(f"wrong child answers, e.g. {found['bad']}")
    return found["one"], found["all"], calls


async def run() -> list[Metric]:
    one, batch, calls = await _measure()
    rounds = WARMUP + ROUNDS
    expected = 2 + rounds * (1 + CHILDREN) * 3  # the root's 2 turns; 3 calls per child
    if calls != expected:
        raise RuntimeError(f"{calls} LM calls, expected {expected}")
    ratio = statistics.median(batch) / statistics.median(one)
    return [
        timing(NAME, "rlm_query: one child alone (a sandbox, 3 LM calls of 50 ms)", one, "ms"),
        timing(NAME, f"rlm_query_batched of {CHILDREN} such children", batch, "ms"),
        Metric(
            NAME,
            f"{CHILDREN} children batched / one child alone (p50)",
            "x",
            ratio,
            target_op="<=",
            target=2.0,
            extra={"lm_calls": calls},
        ).check(),
    ]
