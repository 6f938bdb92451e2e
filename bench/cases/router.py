"""Routed sub-calls: 1,000 `LMRouter.complete` calls, 100 in flight, against an instantly
answering OpenAI-compatible HTTP server in a process of its own (keep-alive, one fixed JSON
reply): calls/s and this process's CPU time per call, lean HTTP transport vs litellm, and the
seed's `LMHandler` with its `OpenAIClient` pointed at the same server, on the same 1,000
prompts, both ways it takes them:
- "handler": 1,000 single requests, 100 in flight (100 threads, each a new TCP connection per
  request, 4-byte length + JSON, as its LocalREPL's `llm_query` sends them) -> a handler
  thread per request -> its sync `openai.OpenAI` client (one shared keep-alive pool);
- "batched": one request carrying the 1,000 prompts (its `llm_query_batched`) -> `asyncio.run`
  of `asyncio.gather` over its `openai.AsyncOpenAI` client. A fresh client and handler per
  batch, as each seed completion makes them: its second batch on one client fails about half
  the time ("Event loop is closed": the async pool outlives the loop `asyncio.run` closed).
The seed's CPU includes its requesting threads' (the REPL side runs in its process).

Each measurement runs in a fresh process (`python -m bench.cases.router WHAT URL`), so that
one side's imports, pools and garbage do not weigh on another's figures.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

from bench.common import Metric, in_fresh_process, unmeasured

NAME = "router"
DESCRIPTION = "LMRouter.complete, 1,000 calls with 100 in flight, instant HTTP LM: lean vs litellm"
CALLS, IN_FLIGHT, WARM_UP, REPEATS = 1000, 100, 100, 3
MODEL = "gpt-4o-mini"  # priced in litellm's table: cost accounting runs as in production
SPEED_UP = 3.0  # ours vs the seed's handler, calls/s (issue 17)


async def _measure(transport: str, base_url: str) -> dict[str, float]:
    from rlm_orchestrator.router import LMClientConfig, LMRouter, UsageTracker

    kwargs = {"model_name": MODEL, "api_base": base_url, "api_key": "sk-bench"}
    config = LMClientConfig.from_backend(
        "openai", {**kwargs, "transport": transport, "max_concurrency": IN_FLIGHT}
    )
    router = LMRouter(config)
    await router.prepare()
    tracker = UsageTracker()
    try:
        await asyncio.gather(*(router.complete("x", tracker=tracker) for _ in range(WARM_UP)))
        best: dict[str, float] = {}
        for _ in range(REPEATS):
            wall, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(router.complete("x", tracker=tracker) for _ in range(CALLS)))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if not best or wall < best["wall"]:
                best = {"wall": wall, "cpu": cpu}
        summary = tracker.summary().model_usage_summaries[MODEL]
        assert summary.total_calls == WARM_UP + REPEATS * CALLS and summary.total_cost > 0
        return {"calls_per_s": CALLS / best["wall"], "cpu_ms_per_call": best["cpu"] / CALLS * 1e3}
    finally:
        await router.finish_callbacks()


def _seed_handler(base_url: str, modules: dict[str, Any]) -> Any:
    """The seed's handler with its OpenAI client on `base_url`, started."""
    client = modules["openai_client"].OpenAIClient(
        api_key="sk-bench", model_name=MODEL, base_url=base_url
    )
    handler = modules["lm_handler"].LMHandler(client)
    handler.start()
    return handler


def _seed_singles(handler: Any, comms: Any, calls: int) -> None:
    """`calls` single requests, IN_FLIGHT at a time (one thread each, as many REPL threads)."""
    errors: list[str] = []

    def send(count: int) -> None:
        for _ in range(count):
            reply = comms.send_lm_request(handler.address, comms.LMRequest(prompt="x", depth=1))
            if reply.error or reply.chat_completion.response != "y":
                errors.append(str(reply.error))

    threads = [threading.Thread(target=send, args=(calls // IN_FLIGHT,)) for _ in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} seed calls failed: {errors[0][:200]}")


def _seed_batch(handler: Any, comms: Any, calls: int) -> None:
    replies = comms.send_lm_request_batched(handler.address, ["x"] * calls, depth=1)
    failed = [r.error for r in replies if r.error or r.chat_completion.response != "y"]
    if failed or len(replies) != calls:
        raise RuntimeError(f"{len(failed)} seed calls failed: {str(failed[:1])[:200]}")


def _measure_seed(how: str, base_url: str) -> dict[str, float]:
    from bench import seed

    modules = seed.load("comms_utils", "lm_handler", "openai_client")
    comms = modules["comms_utils"]
    best: dict[str, float] = {}
    handler = _seed_handler(base_url, modules)
    try:
        if how == "seed-handler":
            _seed_singles(handler, comms, WARM_UP)
        else:  # warms the modules; each measured batch then gets a fresh client, as in the seed
            _seed_batch(handler, comms, WARM_UP)
        for _ in range(REPEATS):
            if how == "seed-batched":
                handler.stop()
                handler = _seed_handler(base_url, modules)
            wall, cpu = time.perf_counter(), time.process_time()
            (_seed_singles if how == "seed-handler" else _seed_batch)(handler, comms, CALLS)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if not best or wall < best["wall"]:
                best = {"wall": wall, "cpu": cpu}
    finally:
        handler.stop()
    return {"calls_per_s": CALLS / best["wall"], "cpu_ms_per_call": best["cpu"] / CALLS * 1e3}


async def _in_process(what: str, base_url: str) -> dict[str, float]:
    result: dict[str, float] = await in_fresh_process("bench.cases.router", what, base_url)
    return result


def _rows(what: str, figures: dict[str, float], targets: bool) -> list[Metric]:
    return [
        Metric(
            NAME, f"{what}: calls/s", "calls/s", figures["calls_per_s"], n=REPEATS,
            target_op=">=" if targets else None, target=1000.0 if targets else None,
        ).check(),
        Metric(
            NAME, f"{what}: orchestrator CPU per call", "ms", figures["cpu_ms_per_call"],
            n=REPEATS, target_op="<=" if targets else None, target=1.0 if targets else None,
        ).check(),
    ]  # fmt: skip


SEED = "seed LMHandler + OpenAIClient"
SEED_SIDES = {
    "seed-handler": f"{SEED}, {CALLS} single requests, {IN_FLIGHT} in flight",
    "seed-batched": f"{SEED}, one batched request of {CALLS} (asyncio.gather)",
}
OURS = f"{CALLS} calls, {IN_FLIGHT} in flight"


async def run() -> list[Metric]:
    from bench import seed

    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.instant_http", stdout=asyncio.subprocess.PIPE
    )
    seeds: dict[str, dict[str, float] | Exception] = {}
    try:
        assert server.stdout is not None
        line = (await server.stdout.readline()).decode().split()
        base_url = line[1]
        lean = await _in_process("http", base_url)
        litellm = await _in_process("litellm", base_url)
        for how in SEED_SIDES:
            try:
                seeds[how] = await _in_process(how, base_url)
            except Exception as exc:
                seeds[how] = exc
    finally:
        server.terminate()
        await server.wait()
    rows = [
        *_rows(f"LMRouter.complete via lean HTTP, {OURS}", lean, True),
        *_rows(f"LMRouter.complete via litellm, {OURS}", litellm, False),
        Metric(
            NAME, "lean HTTP / litellm, calls/s", "x",
            lean["calls_per_s"] / litellm["calls_per_s"], n=REPEATS,
        ),
    ]  # fmt: skip
    why = await asyncio.to_thread(seed.absent)
    for how, label in SEED_SIDES.items():
        name = f"speed-up, lean LMRouter vs {label} (calls/s)"
        figures = seeds[how]
        if isinstance(figures, Exception):
            rows.append(unmeasured(NAME, name, "x", figures, why, target_op=">=", target=SPEED_UP))
            continue
        rows.extend(_rows(label, figures, False))
        speed_up = lean["calls_per_s"] / figures["calls_per_s"]
        rows.append(
            Metric(NAME, name, "x", speed_up, n=REPEATS, target_op=">=", target=SPEED_UP).check()
        )
    return rows


def _main(argv: list[str]) -> Any:
    what, base_url = argv
    if what.startswith("seed-"):
        figures = _measure_seed(what, base_url)
    else:
        figures = asyncio.run(_measure(what, base_url))
    print(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1:])
