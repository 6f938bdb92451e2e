"""Round trip of `x = 1` on a warm sandbox: our local and Docker agents vs the seed's REPLs."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
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
# The seed's DockerREPL needs an image with python3: the sandbox image's base (self-built
# without a registry, else python:3.11-slim), whichever is here.
SEED_DOCKER_IMAGES = ("rlm-sandbox-base:bookworm", "python:3.11-slim")


def _seed_docker_image() -> str:
    if explicit := os.environ.get("RLM_BENCH_SEED_IMAGE"):
        return explicit
    import docker

    client = docker.from_env()
    try:
        for image in SEED_DOCKER_IMAGES:
            try:
                client.images.get(image)
                return image
            except docker.errors.ImageNotFound:
                continue
    finally:
        client.close()
    raise RuntimeError(f"none of {SEED_DOCKER_IMAGES} is here (`make sandbox-image` makes one)")


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
    """The seed's DockerREPL, unchanged but for its container start (see `SeedDockerREPL`)."""
    import subprocess

    from bench import seed

    docker_repl = seed.load()["docker_repl"]

    class SeedDockerREPL(docker_repl.DockerREPL):  # type: ignore[name-defined, misc]
        """The seed's setup() on an image without network, `python`, dill or requests:
        a bind-mounted stub dir adds `python` (-> python3) and an unused `requests` module;
        dill is absent, so the seed's script falls back to pickle (its own fallback).
        execute_code (one `docker exec python -c <script>` per block) is the seed's."""

        def setup(self) -> None:
            stub = Path(self.temp_dir) / ".stub"
            (stub / "bin").mkdir(parents=True)
            (stub / "bin" / "python").symlink_to("/usr/bin/python3")
            (stub / "requests.py").write_text("def post(*a, **k):\n    raise OSError('none')\n")
            result = subprocess.run(
                [
                    "docker",
                    "run",
                    "-d",
                    "--rm",
                    "--network",
                    "none",
                    "-v",
                    f"{self.temp_dir}:/workspace",
                    "-e",
                    "PATH=/workspace/.stub/bin:/usr/local/bin:/usr/bin:/bin",
                    "-e",
                    "PYTHONPATH=/workspace/.stub",
                    "--label",
                    "rlm.bench=seed-docker-repl",
                    self.image,
                    "tail",
                    "-f",
                    "/dev/null",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"Failed to start container: {result.stderr}")
            self.container_id = result.stdout.strip()

    workspace = tempfile.mkdtemp(prefix="rlm-bench-seed-")
    previous = os.environ.get("RLM_DOCKER_WORKSPACE_DIR")
    os.environ["RLM_DOCKER_WORKSPACE_DIR"] = workspace  # the seed's default is ./.rlm_workspace
    try:
        repl = SeedDockerREPL(image=image)
    finally:
        if previous is None:
            os.environ.pop("RLM_DOCKER_WORKSPACE_DIR", None)
        else:
            os.environ["RLM_DOCKER_WORKSPACE_DIR"] = previous
    try:
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
    finally:
        repl.cleanup()
        shutil.rmtree(workspace, ignore_errors=True)


async def run() -> list[Metric]:
    from bench import seed

    metrics: list[Metric] = []
    local = await _ours(LocalProvider(), LOCAL_N)  # jailed where the kernel allows it
    metrics.append(timing(NAME, "ours, local agent", local, "ms", "<", 1.0))
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
            image = await asyncio.to_thread(_seed_docker_image)
            seed_docker = await asyncio.to_thread(_seed_docker, image, SEED_DOCKER_N)
            note = f"image {image}, pickle instead of dill (not in the image)"
            metrics.append(timing(NAME, label, seed_docker, "ms", note=note))
        except Exception as exc:
            metrics.append(unmeasured(NAME, label, "ms", exc, None))
    name = "speed-up, our Docker agent vs seed DockerREPL (p50)"
    if docker and seed_docker:
        ratio = statistics.median(seed_docker) / statistics.median(docker)
        metrics.append(Metric(NAME, name, "x", ratio, target_op=">=", target=50.0).check())
    else:
        why = absent(no_docker, no_seed)
        metrics.append(
            unmeasured(NAME, name, "x", "a side was not measured", why, target_op=">=", target=50.0)
        )
    return metrics
