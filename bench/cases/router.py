"""Routed sub-calls: 1,000 `LMRouter.complete` calls, 100 in flight, against an instantly
answering OpenAI-compatible HTTP server in a process of its own (keep-alive, one fixed JSON
reply): calls/s and this process's CPU time per call, lean HTTP transport vs litellm.

Each measurement runs in a fresh process (`python -m bench.cases.router TRANSPORT URL`), so
that one transport's imports, pools and garbage do not weigh on the other's figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from bench.common import Metric

NAME = "router"
DESCRIPTION = "LMRouter.complete, 1,000 calls with 100 in flight, instant HTTP LM: lean vs litellm"
CALLS, IN_FLIGHT, WARM_UP, REPEATS = 1000, 100, 100, 3
MODEL = "gpt-4o-mini"  # priced in litellm's table: cost accounting runs as in production


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


async def _in_process(transport: str, base_url: str) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.cases.router", transport, base_url,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the {transport} measurement failed (exit {process.returncode})")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def run() -> list[Metric]:
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.instant_http", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        line = (await server.stdout.readline()).decode().split()
        base_url = line[1]
        lean = await _in_process("http", base_url)
        litellm = await _in_process("litellm", base_url)
    finally:
        server.terminate()
        await server.wait()
    rows: list[Metric] = []
    for label, figures, target in (("lean HTTP", lean, True), ("litellm", litellm, False)):
        what = f"LMRouter.complete via {label}, {CALLS} calls, {IN_FLIGHT} in flight"
        rows.append(
            Metric(
                NAME, f"{what}: calls/s", "calls/s", figures["calls_per_s"], n=REPEATS,
                target_op=">=" if target else None, target=1000.0 if target else None,
            ).check()
        )  # fmt: skip
        rows.append(
            Metric(
                NAME, f"{what}: orchestrator CPU per call", "ms", figures["cpu_ms_per_call"],
                n=REPEATS, target_op="<=" if target else None, target=1.0 if target else None,
            ).check()
        )  # fmt: skip
    ratio = lean["calls_per_s"] / litellm["calls_per_s"]
    rows.append(Metric(NAME, "lean HTTP / litellm, calls/s", "x", ratio, n=REPEATS))
    return rows


def _main(argv: list[str]) -> Any:
    figures = asyncio.run(_measure(argv[0], argv[1]))
    print(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1:])
