"""Shared helpers: metrics with targets, statistics, a silent sandbox handler, the machine,
and what a row needs (a row whose requirement is absent here is not applicable; any other
row without a value fails the run)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rlm_orchestrator.sandbox import SubCallOutcome

OPS = {
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
}


@dataclass
class Metric:
    """One measured number (p50 of repetitions, or a ratio) and its optional target."""

    bench: str
    name: str
    unit: str
    value: float | None
    p99: float | None = None
    n: int = 0
    target_op: str | None = None
    target: float | None = None
    passed: bool | None = None
    miss: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # False only when what the row needs is absent on this machine (no Docker engine, ...).
    applicable: bool = True

    def check(self) -> Metric:
        if self.target_op is None or self.target is None:
            return self
        if self.value is None:
            self.passed = None  # no value: not applicable, or the run fails (bench.run)
            return self
        self.passed = OPS[self.target_op](self.value, self.target)
        if not self.passed:
            if self.target_op in ("<", "<=") and not self.target:
                self.miss = f"{self.value:g} over the target of {self.target:g}"
            elif self.target_op in ("<", "<="):
                self.miss = f"{self.value / self.target:.2f}x over the target"
            else:
                ratio = self.target / self.value if self.value else float("inf")
                self.miss = f"{ratio:.2f}x short of the target"
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def timing(
    bench: str,
    name: str,
    seconds: Sequence[float],
    unit: str = "ms",
    target_op: str | None = None,
    target: float | None = None,
    note: str = "",
) -> Metric:
    """A metric from repeated durations in seconds, reported in `unit` (ms or us)."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    return Metric(
        bench,
        name,
        unit,
        statistics.median(seconds) * scale,
        percentile(seconds, 99) * scale,
        len(seconds),
        target_op,
        target,
        note=note,
        extra={"mean": statistics.fmean(seconds) * scale, "max": max(seconds) * scale},
    ).check()


def not_measured(bench: str, name: str, unit: str, reason: str, **target: Any) -> Metric:
    """A row that should have been measured here and was not: it fails the run."""
    return Metric(bench, name, unit, None, note=f"not measured: {reason}", **target).check()


def not_applicable(bench: str, name: str, unit: str, reason: str, **target: Any) -> Metric:
    """A row whose requirement is absent on this machine: neither a pass nor a failure."""
    note = f"not applicable: {reason}"
    return Metric(bench, name, unit, None, note=note, applicable=False, **target).check()


def unmeasured(
    bench: str, name: str, unit: str, error: object, absent: str | None, **target: Any
) -> Metric:
    """A row that failed to measure: not applicable when `absent` names a missing
    requirement, else not measured (the run fails) with the error as the reason."""
    if absent is not None:
        return not_applicable(bench, name, unit, absent, **target)
    return not_measured(bench, name, unit, str(error)[:300] or type(error).__name__, **target)


# The image `make sandbox-image` builds (SANDBOX_IMAGE there too).
SANDBOX_IMAGE = os.environ.get("SANDBOX_IMAGE", "rlm-sandbox:latest")


@functools.cache
def docker_absent() -> str | None:
    """Why there is no Docker engine here (None: there is one). Asked as our provider asks:
    the Docker SDK, from the environment (DOCKER_HOST, ...)."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker engine ({type(exc).__name__}: {str(exc)[:150]})"
    return None


def openssl_absent() -> str | None:
    """The fake cluster's PKI is made with the openssl command."""
    return None if shutil.which("openssl") else "no openssl command (the fake cluster's PKI)"


def absent(*reasons: str | None) -> str | None:
    """The first missing requirement among several, if any."""
    return next((r for r in reasons if r is not None), None)


async def discard_output(stream: str, text: str) -> None:
    return None


async def instant_answers(prompts: list[str], model: str, kind: str) -> list[SubCallOutcome]:
    """Sub-calls answered at the agent client: no loop, no router, no LM."""
    return [SubCallOutcome(text="y") for _ in prompts]


def _version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or out.stderr.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def machine() -> dict[str, Any]:
    import grpc

    return {
        "loadavg": list(os.getloadavg()),
        "cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "docker_server": _version(["docker", "version", "--format", "{{.Server.Version}}"]),
        "docker_client": _version(["docker", "version", "--format", "{{.Client.Version}}"]),
    }


async def in_fresh_process(module: str, *args: str) -> Any:
    """`python -m module args...` in a fresh interpreter (its own imports, CPU and GC): the
    JSON of its last stdout line; its last stderr line when it fails."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["(no stderr)"]
        what = args[0] if args else module
        raise RuntimeError(f"the {what} measurement failed (exit {process.returncode}): {tail[0]}")
    return json.loads(out.decode().strip().splitlines()[-1])
