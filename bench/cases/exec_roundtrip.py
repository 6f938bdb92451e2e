"""Round trip of `x = 1` on a warm sandbox: our local and Docker agents vs the seed's REPLs."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench.common import (
    SANDBOX_IMAGE,
    Metric,
    absent,
    discard_output,
    docker_absent,
    instant_answers,
    not_applicable,
    timing,
    unmeasured,
)
from rlm_orchestrator.config import DockerConfig, LocalConfig
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.docker import DockerProvider
from rlm_orchestrator.sandbox.local import LocalProvider

NAME = "exec"
DESCRIPTION = "execution round trip of `x = 1` on a warm sandbox"
WARMUP = 20
LOCAL_N = 1500
DOCKER_N = 500
SEED_LOCAL_N = 2000
SEED_DOCKER_N = 20
# Issue 16's goals.
LOCAL_TARGET_MS = 0.5
DOCKER_SPEEDUP = 100.0


async def _ours(provider: Any, n: int) -> list[float]:
    box = await provider.acquire(SandboxSpec(session_id="bench-exec"))
    try:
        samples = []
        for i in range(WARMUP + n):
            start = time.perf_counter()
            report = await box.client.execute(
                "x = 1", on_output=discard_output, on_sub_call=instant_answers
            )
            elapsed = time.perf_counter() - start
            assert report.status == "ok", report
            if i >= WARMUP:
                samples.append(elapsed)
        return samples
    finally:
        await provider.aclose()


def _seed_local(n: int) -> list[float]:
    from bench import seed

    repl = seed.load()["local_repl"].LocalREPL()
    try:
        samples = []
        for i in range(WARMUP + n):
            start = time.perf_counter()
            repl.execute_code("x = 1")
            if i >= WARMUP:
                samples.append(time.perf_counter() - start)
        return samples
    finally:
        repl.cleanup()


def _seed_docker(image: str, n: int) -> list[float]:
    """The seed's DockerREPL, unchanged but for its container start (`seed.docker_repl`)."""
    from bench import seed

    with seed.docker_repl(image) as repl:
        first = repl.execute_code("x = 1")
        if first.stderr.strip():
            raise RuntimeError(f"the seed's DockerREPL failed: {first.stderr[-300:]}")
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            result = repl.execute_code("x = 1")
            samples.append(time.perf_counter() - start)
            assert "x" in result.locals, result.stderr
        return samples


async def run() -> list[Metric]:
    from bench import seed

    metrics: list[Metric] = []
    local = await _ours(LocalProvider(), LOCAL_N)  # jailed where the kernel allows it
    metrics.append(timing(NAME, "ours, local agent", local, "ms", "<", LOCAL_TARGET_MS))
    unjailed = await _ours(LocalProvider(LocalConfig(isolation="off")), LOCAL_N)
    metrics.append(
        timing(NAME, "ours, local agent, isolation off", unjailed, "ms", note="reference")
    )
    no_docker = await asyncio.to_thread(docker_absent)
    no_seed = await asyncio.to_thread(seed.absent)
    docker: list[float] | None = None
    label = f"ours, Docker agent ({SANDBOX_IMAGE})"
    if no_docker:
        metrics.append(not_applicable(NAME, label, "ms", no_docker))
    else:
        try:
            docker = await _ours(DockerProvider(DockerConfig(image=SANDBOX_IMAGE)), DOCKER_N)
            metrics.append(timing(NAME, label, docker, "ms"))
        except Exception as exc:
            metrics.append(unmeasured(NAME, label, "ms", exc, None))
    label = "seed LocalREPL (in-process exec)"
    try:
        seed_local = await asyncio.to_thread(_seed_local, SEED_LOCAL_N)
        metrics.append(timing(NAME, label, seed_local, "ms", note="reference"))
    except Exception as exc:
        metrics.append(unmeasured(NAME, label, "ms", exc, no_seed))
    seed_docker: list[float] | None = None
    label = "seed DockerREPL (docker exec per block)"
    if why := absent(no_docker, no_seed):
        metrics.append(not_applicable(NAME, label, "ms", why))
    else:
        try:
            image = await asyncio.to_thread(seed.docker_image)
            seed_docker = await asyncio.to_thread(_seed_docker, image, SEED_DOCKER_N)
            note = f"image {image}, pickle instead of dill (not in the image)"
            metrics.append(timing(NAME, label, seed_docker, "ms", note=note))
        except Exception as exc:
            metrics.append(unmeasured(NAME, label, "ms", exc, None))
    name = "speed-up, our Docker agent vs seed DockerREPL (p50)"
    speedup = {"target_op": ">=", "target": DOCKER_SPEEDUP}
    if docker and seed_docker:
        ratio = statistics.median(seed_docker) / statistics.median(docker)
        metrics.append(
            Metric(NAME, name, "x", ratio, target_op=">=", target=DOCKER_SPEEDUP).check()
        )
    else:
        why = absent(no_docker, no_seed)
        metrics.append(unmeasured(NAME, name, "x", "a side was not measured", why, **speedup))
    return metrics
