"""Sandbox acquisition: local cold start, Docker cold start, Docker warm pool."""

from __future__ import annotations

import time

from bench.common import Metric, not_measured, timing
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.docker import DockerOptions, DockerProvider
from rlm_orchestrator.sandbox.local import LocalProvider

NAME = "acquire"
DESCRIPTION = "sandbox acquisition: local cold, Docker cold, Docker warm pool"
LOCAL_N = 15
DOCKER_N = 7
WARM_N = 7


async def _local() -> list[float]:
    provider = LocalProvider()
    samples = []
    try:
        for i in range(LOCAL_N + 1):
            start = time.perf_counter()
            box = await provider.acquire(SandboxSpec(session_id=f"bench-local-{i}"))
            elapsed = time.perf_counter() - start
            await provider.release(box)
            if i:  # the first start also warms the page cache
                samples.append(elapsed)
        return samples
    finally:
        await provider.aclose()


async def _docker_cold() -> list[float]:
    provider = DockerProvider(DockerOptions())
    samples = []
    try:
        for i in range(DOCKER_N + 1):
            start = time.perf_counter()
            box = await provider.acquire(SandboxSpec(session_id=f"bench-docker-{i}"))
            elapsed = time.perf_counter() - start
            await provider.release(box)
            if i:
                samples.append(elapsed)
        return samples
    finally:
        await provider.aclose()


async def _docker_warm() -> list[float]:
    provider = DockerProvider(DockerOptions(warm_pool_size=1))
    samples = []
    try:
        for i in range(WARM_N):
            await provider.warm_up()  # refills the pool (a cold start, not timed)
            start = time.perf_counter()
            box = await provider.acquire(SandboxSpec(session_id=f"bench-warm-{i}"))
            samples.append(time.perf_counter() - start)
            await provider.release(box)
        return samples
    finally:
        await provider.aclose()


async def run() -> list[Metric]:
    metrics = [timing(NAME, "local cold start", await _local(), "ms", "<", 500.0)]
    for label, measure, target in (
        ("Docker cold start", _docker_cold, 1500.0),
        ("Docker warm pool (size 1)", _docker_warm, 5.0),
    ):
        try:
            metrics.append(timing(NAME, label, await measure(), "ms", "<", target))
        except Exception as exc:
            reason = str(exc)[:200]
            metrics.append(not_measured(NAME, label, "ms", reason, target_op="<", target=target))
    return metrics
