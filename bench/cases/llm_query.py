"""`llm_query` transport with an LM that answers at once: our gRPC stream vs the seed's socket.

Ours: a real local agent runs `llm_query('x')` in a loop; the orchestrator side answers from an
`on_sub_call` callback that returns immediately. Seed: its LocalREPL's `llm_query` (a new TCP
connection per request, 4-byte length + JSON) to its LMHandler (ThreadingTCPServer) with an
instant BaseLM. Both are timed per call inside the code, so only the transport is measured.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

from bench.common import Metric, discard_output, instant_answers, not_measured, timing
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.local import LocalProvider

NAME = "llm_query"
DESCRIPTION = "llm_query transport overhead with an instantly-answering LM"
CALLS = 2000
BATCH = 1000
BATCH_REPEATS = 5

# Same code on both sides: per-call durations measured where the code runs.
LOOP = f"""
import time as _t, json as _j
_d = []
for _ in range({CALLS}):
    _s = _t.perf_counter()
    _a = llm_query('x')
    _d.append(_t.perf_counter() - _s)
assert _a == 'y', _a
print(_j.dumps(_d))
"""
SEQUENTIAL = f"_answers = [llm_query('x') for _ in range({BATCH})]\nassert set(_answers) == {{'y'}}"
BATCHED = f"_answers = llm_query_batched(['x'] * {BATCH})\nassert set(_answers) == {{'y'}}"


async def _ours() -> tuple[list[float], list[float]]:
    provider = LocalProvider()
    box = await provider.acquire(SandboxSpec(session_id="bench-llm", max_output_chars=10**7))
    try:
        report = await box.client.execute(
            LOOP, on_output=discard_output, on_sub_call=instant_answers
        )
        assert report.status == "ok", report.stderr
        per_call = json.loads(report.stdout)
        batches = []
        for _ in range(BATCH_REPEATS):
            start = time.perf_counter()
            report = await box.client.execute(
                BATCHED, on_output=discard_output, on_sub_call=instant_answers
            )
            batches.append(time.perf_counter() - start)
            assert report.status == "ok", report.stderr
        return per_call, batches
    finally:
        await provider.aclose()


def _seed() -> tuple[list[float], list[float], list[float]]:
    from bench import seed

    modules = seed.load()
    handler = modules["lm_handler"].LMHandler(seed.instant_client())
    address = handler.start()
    repl = modules["local_repl"].LocalREPL(lm_handler_address=address)
    try:
        result = repl.execute_code(LOOP)
        if result.stderr.strip():
            raise RuntimeError(f"the seed's loop failed: {result.stderr[-300:]}")
        per_call = json.loads(result.stdout)
        sequential, batched = [], []
        for code, into in ((SEQUENTIAL, sequential), (BATCHED, batched)):
            for _ in range(BATCH_REPEATS):
                start = time.perf_counter()
                result = repl.execute_code(code)
                into.append(time.perf_counter() - start)
                if result.stderr.strip():
                    raise RuntimeError(f"the seed failed: {result.stderr[-300:]}")
        return per_call, sequential, batched
    finally:
        repl.cleanup()
        handler.stop()


async def run() -> list[Metric]:
    ours_calls, ours_batch = await _ours()
    metrics = [
        timing(NAME, "ours, per llm_query call (gRPC stream)", ours_calls, "us"),
        timing(NAME, f"ours, llm_query_batched of {BATCH}, end to end", ours_batch, "ms"),
    ]
    try:
        seed_calls, seed_seq, seed_batched = await asyncio.to_thread(_seed)
    except Exception as exc:
        reason = str(exc)[:200]
        return [
            *metrics,
            not_measured(NAME, "ratio ours/seed per call", "x", reason, target_op="<=", target=1),
            not_measured(NAME, "batched speed-up", "x", reason, target_op=">=", target=3),
        ]
    ratio = statistics.median(ours_calls) / statistics.median(seed_calls)
    speedup = statistics.median(seed_seq) / statistics.median(ours_batch)
    return [
        *metrics,
        timing(NAME, "seed, per llm_query call (TCP + JSON)", seed_calls, "us"),
        timing(NAME, f"seed, {BATCH} sequential llm_query calls", seed_seq, "ms"),
        timing(NAME, f"seed, llm_query_batched of {BATCH} (reference)", seed_batched, "ms"),
        Metric(
            NAME, "ratio ours/seed per call (p50)", "x", ratio, target_op="<=", target=1.0
        ).check(),
        Metric(
            NAME,
            f"speed-up, our batch of {BATCH} vs {BATCH} sequential seed calls (p50)",
            "x",
            speedup,
            target_op=">=",
            target=3.0,
        ).check(),
    ]
