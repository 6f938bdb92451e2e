"""`llm_query` with an LM that answers at once, through the same layers on both sides.

Both sides stop at litellm's completion call, answered in-process (bench/instant_lm.py), and
run the same code, timed where it runs:
- ours: a real local sandbox; `llm_query` -> worker -> agent -> gRPC stream -> the
  orchestrator's loop (its sub-call path: concurrency slot, budget check, events, the call's
  record) -> LMRouter (model choice, concurrency cap, retry wrapper, span, litellm.acompletion,
  usage and cost accounting), in a completion run by CompletionRunner as `RLM` runs one;
- seed: its LocalREPL's `llm_query` -> a new TCP connection, 4-byte length + JSON -> its
  LMHandler (ThreadingTCPServer, a thread per request: client by model and depth) -> its own
  LiteLLMClient (litellm.completion, or litellm.acompletion for a batch; token tracking) ->
  JSON back.
Reference rows give ours with the model's prices in its config (the router then skips
litellm.completion_cost, its default way to price a call), and ours with sub-calls answered at
the agent client (no loop, no router).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from typing import Any

from bench import instant_lm
from bench.common import Metric, discard_output, instant_answers, timing, unmeasured
from rlm_orchestrator import events as ev
from rlm_orchestrator.config import SandboxLimits
from rlm_orchestrator.loop import LoopSettings
from rlm_orchestrator.router import LMClientConfig, LMRouter, UsageTracker
from rlm_orchestrator.runner import CompletionRunner
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.local import LocalProvider

NAME = "llm_query"
DESCRIPTION = "llm_query per call and batched, LM answering at once at litellm's call"
CALLS = 2000
BATCH = 1000
BATCH_REPEATS = 5
SEQUENTIAL_REPEATS = 3
PROMPT, ANSWER = instant_lm.SUB_PROMPT, instant_lm.SUB_ANSWER

# The same code on both sides: durations measured where the code runs.
CODE = f"""
import time as _t, json as _j
_calls, _batches = [], []
for _ in range({CALLS}):
    _s = _t.perf_counter()
    _a = llm_query({PROMPT!r})
    _calls.append(_t.perf_counter() - _s)
assert _a == {ANSWER!r}, _a
for _ in range({BATCH_REPEATS}):
    _s = _t.perf_counter()
    _b = llm_query_batched([{PROMPT!r}] * {BATCH})
    _batches.append(_t.perf_counter() - _s)
    assert set(_b) == {{{ANSWER!r}}}, set(_b)
print(_j.dumps({{"calls": _calls, "batches": _batches}}))
"""
# The seed alone (what the old target compared our batch with): sequential calls.
SEQUENTIAL = f"""
import time as _t, json as _j
_runs = []
for _ in range({SEQUENTIAL_REPEATS}):
    _s = _t.perf_counter()
    _a = [llm_query({PROMPT!r}) for _ in range({BATCH})]
    _runs.append(_t.perf_counter() - _s)
    assert set(_a) == {{{ANSWER!r}}}, set(_a)
print(_j.dumps(_runs))
"""
TRANSPORT = f"""
import time as _t, json as _j
_calls = []
for _ in range({CALLS}):
    _s = _t.perf_counter()
    _a = llm_query({PROMPT!r})
    _calls.append(_t.perf_counter() - _s)
print(_j.dumps(_calls))
"""


class _Root:
    """The root model: the code in its first turn, then done."""

    def __init__(self) -> None:
        self.turns = 0

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        self.turns += 1
        return f"```repl\n{CODE}\n```" if self.turns == 1 else "FINAL(done)"


async def _ours(priced: bool) -> dict[str, list[float]]:
    """One completion whose root model runs CODE; its stdout is read from the block's event."""
    # litellm itself: the instant LM replaces its acompletion.
    model: dict[str, Any] = {
        "model_name": instant_lm.MODEL,
        "api_key": "unused",
        "transport": "litellm",
    }
    if priced:
        model |= {"input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}
    config = LMClientConfig.from_backend("litellm", model)
    provider = LocalProvider()
    runner_settings = LoopSettings(max_iterations=3, sandbox=SandboxLimits(max_output_chars=10**7))
    outputs: list[str] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.CodeBlockFinished):
            if event.result.status != "ok":
                raise RuntimeError(f"our block failed: {event.result.stderr[-300:]}")
            outputs.append(event.result.stdout)

    runner = CompletionRunner(LMRouter(config), provider, runner_settings, emit=on_event)
    try:
        with instant_lm.instant_litellm(_Root()):
            result = await runner.run(
                "", None, tracker=UsageTracker(), root_model=config.model_name
            )
    finally:
        await provider.aclose()
    if result.response != "done" or len(outputs) != 1:
        raise RuntimeError(f"unexpected completion: {result.response!r:.200}, {outputs!r:.200}")
    parsed: dict[str, list[float]] = json.loads(outputs[0])
    return parsed


async def _ours_transport() -> list[float]:
    provider = LocalProvider()
    box = await provider.acquire(SandboxSpec(session_id="bench-llm-transport"))
    try:
        report = await box.client.execute(
            TRANSPORT, on_output=discard_output, on_sub_call=instant_answers
        )
        assert report.status == "ok", report.stderr
        calls: list[float] = json.loads(report.stdout)
        return calls
    finally:
        await provider.aclose()


def _seed() -> tuple[dict[str, list[float]], list[float]]:
    from bench import seed

    modules = seed.load()
    client = modules["litellm_client"].LiteLLMClient(model_name=instant_lm.MODEL, api_key="unused")
    handler = modules["lm_handler"].LMHandler(client)
    address = handler.start()
    repl = modules["local_repl"].LocalREPL(lm_handler_address=address)
    try:
        outputs = []
        with instant_lm.instant_litellm():
            for code in (CODE, SEQUENTIAL):
                result = repl.execute_code(code)
                if result.stderr.strip():
                    raise RuntimeError(f"the seed failed: {result.stderr[-300:]}")
                outputs.append(json.loads(result.stdout))
        return outputs[0], outputs[1]
    finally:
        repl.cleanup()
        handler.stop()


async def run() -> list[Metric]:
    from bench import seed

    ours = await _ours(priced=False)
    priced = await _ours(priced=True)
    transport = await _ours_transport()
    per_call = "ours, per llm_query call (gRPC stream, loop, LMRouter, instant litellm)"
    our_batch = f"ours, llm_query_batched of {BATCH} (gRPC stream, loop, LMRouter, instant litellm)"
    no_cost = "prices in the model's config (no litellm.completion_cost)"
    metrics = [
        timing(NAME, per_call, ours["calls"], "us"),
        timing(NAME, our_batch, ours["batches"], "ms"),
        timing(
            NAME, f"ours, per llm_query call, {no_cost}", priced["calls"], "us", note="reference"
        ),
        timing(
            NAME,
            f"ours, llm_query_batched of {BATCH}, {no_cost}",
            priced["batches"],
            "ms",
            note="reference",
        ),
        timing(
            NAME,
            "ours, per llm_query call, answered at the agent client (no loop, no router)",
            transport,
            "us",
            note="reference",
        ),
    ]
    ratio_name = "ratio ours/seed per llm_query call (p50)"
    batch_name = f"speed-up, our llm_query_batched of {BATCH} vs the seed's (p50)"
    try:
        seed_runs, seed_sequential = await asyncio.to_thread(_seed)
    except Exception as exc:
        why = await asyncio.to_thread(seed.absent)
        return [
            *metrics,
            unmeasured(NAME, ratio_name, "x", exc, why, target_op="<=", target=1.0),
            unmeasured(NAME, batch_name, "x", exc, why, target_op=">=", target=1.0),
        ]
    ratio = statistics.median(ours["calls"]) / statistics.median(seed_runs["calls"])
    speedup = statistics.median(seed_runs["batches"]) / statistics.median(ours["batches"])
    versus_sequential = statistics.median(seed_sequential) / statistics.median(ours["batches"])
    return [
        *metrics,
        timing(
            NAME,
            "seed, per llm_query call (TCP + JSON, LMHandler, its LiteLLMClient, instant litellm)",
            seed_runs["calls"],
            "us",
        ),
        timing(
            NAME,
            f"seed, llm_query_batched of {BATCH} (one TCP request, LMHandler, asyncio.gather "
            "in its LiteLLMClient, instant litellm)",
            seed_runs["batches"],
            "ms",
        ),
        timing(NAME, f"seed, {BATCH} sequential llm_query calls", seed_sequential, "ms"),
        Metric(NAME, ratio_name, "x", ratio, target_op="<=", target=1.0).check(),
        Metric(NAME, batch_name, "x", speedup, target_op=">=", target=1.0).check(),
        Metric(
            NAME,
            f"our llm_query_batched of {BATCH} vs {BATCH} sequential seed calls (p50; "
            "not like for like: batched against one at a time)",
            "x",
            versus_sequential,
            note="info",
        ),
    ]
