"""End-to-end fan-out: a completion whose root code runs `llm_query_batched(['q'] * 1000)`
against an instantly answering OpenAI-compatible HTTP server (bench/instant_http.py, a process
of its own), ours and the seed's, each in a fresh process:
- ours: `CompletionRunner` with a local sandbox (default settings: 16 sub-calls in flight per
  completion, the sub model's cap 16); the root model is the scripted LM (in this process,
  called only between blocks), the sub model `gpt-4o-mini` on the instant server through the
  lean transport, priced from litellm's table. One warm-up turn, then REPEATS turns each
  running the block; the batch's wall time is timed inside the code, the orchestrator's CPU
  (`time.process_time`) from the block's start event to its end event.
- seed: its `LocalREPL` (in-process `exec`) -> one batched request over TCP -> its `LMHandler`
  -> `asyncio.gather` over its `OpenAIClient` (`openai.AsyncOpenAI`) on the same server; a
  fresh client, handler and REPL per batch (as per seed completion: its second batch on one
  client fails about half the time); CPU of its process around `execute_code` (the code runs
  in that process too).
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import time
from typing import Any

from bench.common import Metric, in_fresh_process, timing, unmeasured

NAME = "fanout"
DESCRIPTION = "llm_query_batched of 1,000 inside a completion, instant HTTP LM: ours vs the seed"
BATCH, REPEATS = 1000, 3
WALL_TARGET = 1.5  # seconds, the batch end to end (issue 17)
SPEED_UP = 3.0  # ours vs the seed, the batch's wall time (issue 17)
SUB_MODEL, ROOT_MODEL = "gpt-4o-mini", "root"
CODE = f"""
import time as _t, json as _j
_s = _t.perf_counter()
_b = llm_query_batched(['q'] * {BATCH})
_d = _t.perf_counter() - _s
assert _b == ['y'] * {BATCH}, [x for x in _b if x != 'y'][:1]
print(_j.dumps(_d))
"""
BLOCK = f"```repl\n{CODE}\n```"


async def _ours(base_url: str) -> dict[str, list[float]]:
    from rlm_orchestrator import events as ev
    from rlm_orchestrator.loop import LoopSettings
    from rlm_orchestrator.router import LMClientConfig, LMRouter, UsageTracker
    from rlm_orchestrator.runner import CompletionRunner
    from rlm_orchestrator.sandbox.local import LocalProvider
    from rlm_orchestrator.testing.scripted_lm import ScriptedLMServer

    figures: dict[str, list[float]] = {"wall": [], "cpu": [], "outside": []}
    started: list[tuple[float, float]] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.CodeBlockStarted):
            started.append((time.perf_counter(), time.process_time()))
        elif isinstance(event, ev.CodeBlockFinished):
            if event.result.status != "ok":
                raise RuntimeError(f"our block failed: {event.result.stderr[-300:]}")
            wall, cpu = started[-1]
            figures["wall"].append(float(json.loads(event.result.stdout)))
            figures["outside"].append(time.perf_counter() - wall)
            figures["cpu"].append(time.process_time() - cpu)

    with ScriptedLMServer() as root_lm:
        root_lm.set_sequence(ROOT_MODEL, [BLOCK] * (1 + REPEATS) + ["FINAL(done)"])
        key = {"api_key": "sk-bench", "transport": "http"}
        root = LMClientConfig.from_backend(
            "openai", {"model_name": ROOT_MODEL, "api_base": root_lm.base_url, **key}
        )
        sub = LMClientConfig.from_backend(
            "openai", {"model_name": SUB_MODEL, "api_base": base_url, **key}
        )
        router = LMRouter(root, [sub])
        provider = LocalProvider()
        settings = LoopSettings(max_iterations=REPEATS + 2)
        runner = CompletionRunner(router, provider, settings, emit=on_event)
        tracker = UsageTracker()
        try:
            result = await runner.run("", None, tracker=tracker, root_model=ROOT_MODEL)
        finally:
            await provider.aclose()
            await router.finish_callbacks()
    usage = tracker.summary().model_usage_summaries[SUB_MODEL]
    if result.response != "done" or usage.total_calls != BATCH * (1 + REPEATS):
        raise RuntimeError(f"unexpected completion: {result.response!r:.200}, {usage}")
    return {k: v[1:] for k, v in figures.items()}  # the warm-up turn's block left out


def _seed(base_url: str) -> dict[str, list[float]]:
    from bench import seed

    modules = seed.load("lm_handler", "local_repl", "openai_client")
    figures: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(1 + REPEATS):  # a fresh client, handler and REPL per batch, as in the seed
        client = modules["openai_client"].OpenAIClient(
            api_key="sk-bench", model_name=SUB_MODEL, base_url=base_url
        )
        handler = modules["lm_handler"].LMHandler(client)
        repl = modules["local_repl"].LocalREPL(lm_handler_address=handler.start())
        try:
            cpu = time.process_time()
            result = repl.execute_code(CODE)
            cpu = time.process_time() - cpu
            try:
                figures["wall"].append(float(json.loads(result.stdout)))
            except ValueError:
                raise RuntimeError(f"the seed's block failed: {result.stderr[-300:]}") from None
            figures["cpu"].append(cpu)
        finally:
            repl.cleanup()
            handler.stop()
            # Its async client's garbage (and the noise it prints: the pool outlived its
            # loop) is collected here, not in the next measured batch.
            gc.collect()
    return {k: v[1:] for k, v in figures.items()}


async def _in_process(what: str, base_url: str) -> dict[str, list[float]]:
    result: dict[str, list[float]] = await in_fresh_process("bench.cases.fanout", what, base_url)
    return result


async def run() -> list[Metric]:
    from bench import seed

    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.instant_http", stdout=asyncio.subprocess.PIPE
    )
    seed_figures: dict[str, list[float]] | Exception
    try:
        assert server.stdout is not None
        base_url = (await server.stdout.readline()).decode().split()[1]
        ours = await _in_process("ours", base_url)
        try:
            seed_figures = await _in_process("seed", base_url)
        except Exception as exc:
            seed_figures = exc
    finally:
        server.terminate()
        await server.wait()
    what = f"llm_query_batched of {BATCH} in a completion"
    ours_what = f"ours, {what} (local sandbox, loop, LMRouter lean HTTP)"
    rows = [
        timing(NAME, f"{ours_what}: wall time in the code", ours["wall"], "s", "<", WALL_TARGET),
        timing(NAME, f"{ours_what}: orchestrator CPU for the batch", ours["cpu"], "s"),
        Metric(
            NAME, f"{ours_what}: orchestrator CPU per sub-call", "ms",
            statistics.median(ours["cpu"]) / BATCH * 1e3, n=len(ours["cpu"]),
        ),
        timing(NAME, f"{ours_what}: block start to end at the orchestrator", ours["outside"], "s",
               note="info"),
    ]  # fmt: skip
    speed_up = f"speed-up, our {what} vs the seed's (wall time, p50)"
    if isinstance(seed_figures, Exception):
        why = await asyncio.to_thread(seed.absent)
        return [
            *rows,
            unmeasured(NAME, speed_up, "x", seed_figures, why, target_op=">=", target=SPEED_UP),
        ]
    seed_what = f"seed, {what} (LocalREPL, LMHandler, OpenAIClient)"
    return [
        *rows,
        timing(NAME, f"{seed_what}: wall time in the code", seed_figures["wall"], "s"),
        timing(NAME, f"{seed_what}: its process's CPU for the batch", seed_figures["cpu"], "s"),
        Metric(
            NAME, speed_up, "x",
            statistics.median(seed_figures["wall"]) / statistics.median(ours["wall"]),
            n=REPEATS, target_op=">=", target=SPEED_UP,
        ).check(),
    ]  # fmt: skip


def _main(argv: list[str]) -> Any:
    what, base_url = argv
    figures = asyncio.run(_ours(base_url)) if what == "ours" else _seed(base_url)
    print(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1:])
