"""Sandbox acquisition: local cold start (isolated, and with isolation off), the jail's own
set-up, Docker cold start and warm pool, Kubernetes (a fake cluster whose kubelet runs real
agents: the provider's API round trips, the watch, the probe, TLS) cold pod and warm pool; the
seed's side: its LocalREPL's construction (in-process: no sandbox) and its DockerREPL's start."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    SANDBOX_IMAGE,
    Metric,
    absent,
    docker_absent,
    not_applicable,
    not_measured,
    openssl_absent,
    timing,
    unmeasured,
)
from rlm_orchestrator.config import DockerConfig, KubernetesConfig, LocalConfig
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.docker import DockerProvider
from rlm_orchestrator.sandbox.kubernetes import KubernetesProvider
from rlm_orchestrator.sandbox.local import LocalProvider
from tests.fakes.fake_cluster import TOKEN_ENV, FakeCluster

NAME = "acquire"
DESCRIPTION = "sandbox acquisition: local, Docker and Kubernetes (fake cluster), cold and warm"
LOCAL_N = 15
JAIL_N = 30
DOCKER_N = 7
WARM_N = 7
SEED_LOCAL_N = 50
SEED_DOCKER_N = 5
LOCAL_TARGET_MS = 20.0  # issue 16


async def _local(isolations: tuple[str, ...]) -> dict[str, list[float]]:
    """Cold starts with the jail (the default) and without, alternated so that both see the
    same machine load."""
    providers = {i: LocalProvider(LocalConfig.model_validate({"isolation": i})) for i in isolations}
    samples: dict[str, list[float]] = {i: [] for i in isolations}
    try:
        for i in range(LOCAL_N + 1):
            for isolation, provider in providers.items():
                start = time.perf_counter()
                box = await provider.acquire(SandboxSpec(session_id=f"bench-local-{i}"))
                elapsed = time.perf_counter() - start
                await provider.release(box)
                if i:  # the first start also warms the page cache
                    samples[isolation].append(elapsed)
        return samples
    finally:
        for provider in providers.values():
            await provider.aclose()


# In a fresh process that has imported the worker (as the agent's spawned worker has): the
# time from calling jail.enter() to being the jailed worker, measured by the worker itself.
_JAIL_PROBE = """
import sys, time
from pathlib import Path
import sandbox_agent.worker
from sandbox_agent import jail
start = time.perf_counter()
got = jail.enter(jail.JailConfig(Path(sys.argv[1]), Path(sys.argv[2]), keep_fds=(1,)))
print(got, time.perf_counter() - start, flush=True)
"""


def _jail_setup() -> list[float]:
    samples = []
    with tempfile.TemporaryDirectory(prefix="bench-jail-") as root:
        work, state = Path(root, "work"), Path(root, "state")
        for i in range(JAIL_N + 1):
            work.mkdir(exist_ok=True)
            state.mkdir(exist_ok=True)
            command = [sys.executable, "-c", _JAIL_PROBE, str(work), str(state)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            got, seconds = output.rsplit(maxsplit=1)
            if got != "namespaces":
                raise RuntimeError(f"no jail here: {output.strip()}")
            if i:
                samples.append(float(seconds))
    return samples


async def _docker_cold() -> list[float]:
    provider = DockerProvider(DockerConfig(image=SANDBOX_IMAGE))
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


def _seed_local() -> list[float]:
    """The seed's LocalREPL constructed (its temp dir, its namespace); cleanup not timed."""
    from bench import seed

    local_repl = seed.load()["local_repl"]
    samples = []
    for i in range(SEED_LOCAL_N + 1):
        start = time.perf_counter()
        repl = local_repl.LocalREPL()
        elapsed = time.perf_counter() - start
        repl.cleanup()
        if i:
            samples.append(elapsed)
    return samples


def _seed_docker() -> list[float]:
    """The seed's DockerREPL constructed: its LM proxy thread and its `docker run` (its
    `pip install dill requests` left out: no network here; see `seed.docker_repl`)."""
    from bench import seed

    image = seed.docker_image()
    samples = []
    for i in range(SEED_DOCKER_N + 1):
        start = time.perf_counter()
        with seed.docker_repl(image):
            elapsed = time.perf_counter() - start
        if i:
            samples.append(elapsed)
    return samples


async def _docker_warm() -> list[float]:
    provider = DockerProvider(DockerConfig(image=SANDBOX_IMAGE, warm_pool_size=1))
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


async def _pool_refilled(provider: KubernetesProvider, size: int) -> None:
    for _ in range(2000):  # bounded: at most about 40 s
        if await provider.pool_ready() >= size:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the warm pool was not refilled")


async def _kubernetes(pool_size: int) -> list[float]:
    """Cold: a pod created, watched to Ready, dialled. Warm: an idle pod leased by patch."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-kube-") as root,
        FakeCluster(Path(root)) as cluster,
    ):
        os.environ[TOKEN_ENV] = cluster.token
        options = cluster.options(pool_size=pool_size, pool_check_seconds=0.1)
        provider = KubernetesProvider(KubernetesConfig.model_validate(options))
        samples = []
        try:
            await provider.warm_up()
            for i in range(WARM_N + 1):
                await _pool_refilled(provider, pool_size)  # not timed
                start = time.perf_counter()
                box = await provider.acquire(SandboxSpec(session_id=f"bench-kube-{i}"))
                elapsed = time.perf_counter() - start
                await provider.release(box)
                if i:
                    samples.append(elapsed)
            return samples
        finally:
            await provider.aclose()
            del os.environ[TOKEN_ENV]


async def run() -> list[Metric]:
    from bench import seed

    jailed = "local cold start (jailed: namespaces)"
    isolation = await LocalProvider().check_isolation()
    # The kernel refuses user namespaces here: the jailed rows do not apply.
    no_jail = None if isolation == "namespaces" else f"no jail on this kernel ({isolation})"
    target = {"target_op": "<", "target": LOCAL_TARGET_MS}
    metrics: list[Metric] = []
    if no_jail:
        local = await _local(("off",))
        metrics.append(not_applicable(NAME, jailed, "ms", no_jail, **target))
    else:
        local = await _local(("required", "off"))
        metrics.append(timing(NAME, jailed, local["required"], "ms", "<", LOCAL_TARGET_MS))
    off = local["off"]
    metrics.append(timing(NAME, "local cold start, isolation off", off, "ms", note="reference"))
    no_seed = await asyncio.to_thread(seed.absent)
    label = "seed LocalREPL construction (in-process: no sandbox, info)"
    try:
        metrics.append(timing(NAME, label, await asyncio.to_thread(_seed_local), "ms"))
    except Exception as exc:
        metrics.append(unmeasured(NAME, label, "ms", exc, no_seed))
    label = "jail set-up in the worker (enter())"
    try:
        if no_jail:
            raise RuntimeError(no_jail)
        jail = await asyncio.to_thread(_jail_setup)
        metrics.append(timing(NAME, label, jail, "ms", "<", 5.0))
    except Exception as exc:
        metrics.append(unmeasured(NAME, label, "ms", exc, no_jail, target_op="<", target=5.0))
    no_docker = await asyncio.to_thread(docker_absent)
    measured: dict[str, list[float]] = {}
    for label, measure, limit, missing in (
        (f"Docker cold start ({SANDBOX_IMAGE})", _docker_cold, 1500.0, no_docker),
        ("Docker warm pool (size 1)", _docker_warm, 5.0, no_docker),
        ("Kubernetes cold pod (fake cluster)", lambda: _kubernetes(0), 1500.0, openssl_absent()),
        (
            "Kubernetes warm pool (fake cluster, size 1)",
            lambda: _kubernetes(1),
            50.0,
            openssl_absent(),
        ),
    ):
        try:
            if missing:
                raise RuntimeError(missing)
            measured[label] = await measure()
            metrics.append(timing(NAME, label, measured[label], "ms", "<", limit))
        except Exception as exc:
            metrics.append(unmeasured(NAME, label, "ms", exc, missing, target_op="<", target=limit))
    metrics.extend(
        await _seed_docker_rows(
            measured.get(f"Docker cold start ({SANDBOX_IMAGE})"), absent(no_docker, no_seed)
        )
    )
    return metrics


async def _seed_docker_rows(ours: list[float] | None, missing: str | None) -> list[Metric]:
    """The seed's DockerREPL start, and our Docker cold start against it (info)."""
    label = "seed DockerREPL start (docker run; its pip install left out, info)"
    ratio = "speed-up, our Docker cold start vs seed DockerREPL start (p50, info)"
    try:
        if missing:
            raise RuntimeError(missing)
        theirs = await asyncio.to_thread(_seed_docker)
    except Exception as exc:
        return [
            unmeasured(NAME, label, "ms", exc, missing),
            unmeasured(NAME, ratio, "x", exc, missing),
        ]
    rows = [timing(NAME, label, theirs, "ms")]
    if ours is None:
        rows.append(not_measured(NAME, ratio, "x", "our Docker cold start was not measured"))
    else:
        rows.append(Metric(NAME, ratio, "x", statistics.median(theirs) / statistics.median(ours)))
    return rows
