"""Scale: 64 concurrent completions on one server (scripted LM, 50 ms per call), its peak RSS,
and the memory of an idle local sandbox (USS, PSS and RSS of the agent and its jailed worker)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench import server
from bench.common import Metric, percentile, timing
from bench.sandboxes import Memory, memory, owner_label, processes_of, start_idle
from rlm_orchestrator import events as ev
from rlm_orchestrator.client import AsyncClient
from rlm_orchestrator.sandbox import Sandbox
from rlm_orchestrator.sandbox.local import LocalProvider
from rlm_orchestrator.testing.scripted_lm import RecordedRequest, Rule, Script, ScriptedLMServer

NAME = "scale"
DESCRIPTION = "64 concurrent completions (scripted LM, 50 ms/call): time, peak RSS; idle memory"
CONCURRENT = 64
ROUNDS = 2  # a round takes a few s on 2 cores (64 sandbox starts)
LM_DELAY = 0.05
LM_CALLS = 3  # root turn 1 (repl block) + llm_query + root turn 2 (FINAL_VAR)
IDLE_SANDBOXES = 8
IDLE_SECONDS = 0.5
SAMPLE_INTERVAL = 0.02
SUB_ANSWER = "sub says hi"
MB = 1024 * 1024

REPL_TURN = "```repl\nx = llm_query('q')\n```"


def _root_reply(request: RecordedRequest) -> str:
    # Per-request, not a shared sequence: 64 interleaved completions each get turn 1 then 2.
    # Turn 1 is system prompt + context metadata + user prompt; later turns are longer.
    return REPL_TURN if len(request.messages) == 3 else "FINAL_VAR(x)"


class _RSSSampler:
    """Samples a process's RSS (and its tree's) on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.peak_tree = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                own = self.process.memory_info().rss
            except psutil.Error:
                return
            tree = own
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a child that just ended
                    tree += child.memory_info().rss
            self.peak, self.peak_tree = max(self.peak, own), max(self.peak_tree, tree)
            self.samples += 1
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> _RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _one(client: AsyncClient, i: int, start: float, marks: dict[str, list[float]]) -> str:
    first_block: list[float] = []

    def on_event(event: ev.StreamEvent) -> None:
        if isinstance(event, ev.CodeBlockStarted) and not first_block:
            first_block.append(time.perf_counter() - start)

    result = await client.completion(f"ctx {i}", on_event=on_event)
    marks["latency"].append(time.perf_counter() - start)
    marks["first_block"].extend(first_block)
    return result.response


async def _round(client: AsyncClient, marks: dict[str, list[float]]) -> float:
    start = time.perf_counter()
    answers = await asyncio.gather(*(_one(client, i, start, marks) for i in range(CONCURRENT)))
    elapsed = time.perf_counter() - start
    wrong = [a for a in answers if a != SUB_ANSWER]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[0]!r}"
    return elapsed


async def _idle_sandboxes() -> tuple[list[Memory], list[float]]:
    """Per idle sandbox: the memory of the agent and every process under it (its jailed worker
    is three processes sharing most pages), and the cold start times (s)."""
    with owner_label():
        provider = LocalProvider()
        boxes: list[Sandbox] = []
        try:
            starts = await start_idle(provider, boxes, IDLE_SANDBOXES, 1, "bench-scale-idle")
            await asyncio.sleep(IDLE_SECONDS)
            return [memory(mine.values()) for mine in processes_of(boxes)], starts
        finally:
            await provider.aclose()


def _mb_metric(name: str, values: list[float], **target: object) -> Metric:
    return Metric(
        NAME,
        name,
        "MB",
        statistics.median(values),
        percentile(values, 99),
        len(values),
        extra={"values": [round(v, 1) for v in values]},
        **target,  # type: ignore[arg-type]
    ).check()


async def run() -> list[Metric]:
    script = Script(
        rules=[
            Rule(_root_reply, model="root", delay_seconds=LM_DELAY),
            Rule(SUB_ANSWER, model="sub", delay_seconds=LM_DELAY),
        ]
    )
    walls: list[float] = []
    pooled_walls: list[float] = []
    marks: dict[str, list[float]] = {"latency": [], "first_block": []}
    with ScriptedLMServer(script) as lm, tempfile.TemporaryDirectory() as tmp:
        config = server.config(lm.base_url, Path(tmp), CONCURRENT, NAME)
        process, target = await asyncio.to_thread(server.start, config)
        try:
            rest_rss = psutil.Process(process.pid).memory_info().rss
            async with AsyncClient(target) as client:
                with _RSSSampler(process.pid) as sampler:
                    for _ in range(ROUNDS):
                        walls.append(await _round(client, marks))
        finally:
            await asyncio.to_thread(server.stop, process)
        # The same with a warm pool of 64 local sandboxes, full at the round's start (a server
        # fills it before it listens; one round per server, so none waits for a refill).
        pool = f"environment_kwargs = {{ warm_pool_size = {CONCURRENT} }}"
        config = server.config(lm.base_url, Path(tmp), CONCURRENT, f"{NAME}-pool", pool)
        for _ in range(ROUNDS):
            process, target = await asyncio.to_thread(server.start, config)
            try:
                async with AsyncClient(target) as client:
                    pooled_walls.append(await _round(client, {"latency": [], "first_block": []}))
            finally:
                await asyncio.to_thread(server.stop, process)
        calls = len(lm.requests)
    expected = 2 * ROUNDS * CONCURRENT * LM_CALLS
    assert calls == expected, f"{calls} LM calls, expected {expected}"

    idle, starts = await _idle_sandboxes()
    cold_start = statistics.median(starts)
    ideal = LM_CALLS * LM_DELAY + cold_start
    total = timing(NAME, f"{CONCURRENT} concurrent completions, total wall time", walls, "ms")
    total.extra["rounds"] = [round(w * 1e3, 1) for w in walls]
    total.extra["lm_calls"] = calls
    idle_label = f"per idle local sandbox (agent + jailed worker, {IDLE_SECONDS:g} s idle)"
    metrics = [
        total,
        Metric(
            NAME,
            f"ideal: {LM_CALLS} LM calls x {LM_DELAY * 1e3:.0f} ms + one local sandbox start",
            "ms",
            ideal * 1e3,
            extra={"lm_ms": LM_CALLS * LM_DELAY * 1e3, "sandbox_start_ms": cold_start * 1e3},
        ),
        Metric(
            NAME, "total / ideal", "x", statistics.median(walls) / ideal, target_op="<=", target=2.0
        ).check(),
        timing(
            NAME,
            f"{CONCURRENT} concurrent completions, warm pool of {CONCURRENT}, total wall time",
            pooled_walls,
            "ms",
        ),
        Metric(
            NAME,
            f"total / ideal, warm pool of {CONCURRENT} (info)",
            "x",
            statistics.median(pooled_walls) / ideal,
        ),
        timing(NAME, "per completion: start -> first code block (info)", marks["first_block"]),
        timing(NAME, "per completion: start -> answer (info)", marks["latency"]),
        Metric(
            NAME,
            "orchestrator server peak RSS during the runs",
            "MB",
            sampler.peak / MB,
            extra={
                "rss_at_rest_mb": rest_rss / MB,
                "peak_with_sandboxes_mb": sampler.peak_tree / MB,
                "samples": sampler.samples,
            },
        ),
        Metric(
            NAME,
            "server + its sandboxes, peak RSS (info)",
            "MB",
            sampler.peak_tree / MB,
        ),
        _mb_metric(f"USS {idle_label}", [m.uss for m in idle], target_op="<", target=10.0),
        _mb_metric("RSS sum per idle local sandbox (info)", [m.rss for m in idle]),
        _mb_metric("PSS per idle local sandbox (info)", [m.pss for m in idle]),
    ]
    metrics[-3].extra["processes_per_sandbox"] = [m.processes for m in idle]
    return metrics
