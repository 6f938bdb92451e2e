"""256 idle local sandboxes: their total memory (PSS of every process of theirs), the time to
start them (16 at a time, through `LocalProvider`), and that none of their processes outlives
the release."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import statistics
import time
from pathlib import Path

import psutil

from bench.common import Metric, not_measured, timing
from bench.sandboxes import (
    directory_of,
    labelled,
    memory,
    owner_label,
    processes_of,
    release_all,
    start_idle,
    survivors,
)
from rlm_orchestrator.sandbox import Sandbox
from rlm_orchestrator.sandbox.local import LocalProvider

NAME = "idle"
DESCRIPTION = "256 idle local sandboxes (16 starting at a time): total memory, start time, leaks"
COUNT = 256
AT_ONCE = 16
IDLE_SECONDS = 1.0
TARGET_GB = 3.0  # issue 16
GB = 1024.0  # MB
# A sandbox holds a few descriptors here (its agent's pipe, its channel's socket).
FDS_NEEDED = 16 * COUNT + 1024


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FDS_NEEDED if hard == resource.RLIM_INFINITY else min(hard, FDS_NEEDED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def run() -> list[Metric]:
    _raise_fd_limit()
    with owner_label() as label:
        provider = LocalProvider()
        seen: list[psutil.Process] = []
        boxes: list[Sandbox] = []
        roots: list[Path] = []
        try:
            started = time.perf_counter()
            starts = await start_idle(provider, boxes, COUNT, AT_ONCE, "bench-idle")
            all_up = time.perf_counter() - started
            roots = [root for box in boxes if (root := directory_of(box)) is not None]
            await asyncio.sleep(IDLE_SECONDS)
            measuring = time.perf_counter()
            found: dict[int, psutil.Process] = {}
            per_box: list[int] = []
            for mine in await asyncio.to_thread(processes_of, boxes):
                per_box.append(len(mine))
                found.update(mine)
            # Processes of the sandboxes outside the agents' and workers' trees (a fork
            # server's, a double fork's) count too.
            outside = {
                pid: p
                for pid, p in (await asyncio.to_thread(labelled, label)).items()
                if pid not in found
            }
            found.update(outside)
            seen = list(found.values())
            total = await asyncio.to_thread(memory, seen)
            measure_seconds = time.perf_counter() - measuring
        finally:
            released = time.perf_counter()
            await release_all(provider, boxes, AT_ONCE)
            release_seconds = time.perf_counter() - released
        left = await survivors(label, seen)
        dirs_left = [str(root) for root in roots if root.exists()]
        for process in left:  # reported below; not left running on the machine
            with contextlib.suppress(psutil.Error):
                process.kill()
    per_pss = total.pss / COUNT
    return [
        Metric(
            NAME,
            f"{COUNT} idle local sandboxes: total PSS (every process of theirs)",
            "GB",
            total.pss / GB,
            n=COUNT,
            target_op="<",
            target=TARGET_GB,
            extra={"processes": total.processes, "outside_the_trees": len(outside)},
        ).check(),
        Metric(NAME, f"{COUNT} idle local sandboxes: total RSS (info)", "GB", total.rss / GB),
        Metric(NAME, f"{COUNT} idle local sandboxes: total USS (info)", "GB", total.uss / GB),
        Metric(
            NAME,
            f"PSS per sandbox: total / {COUNT} (info)",
            "MB",
            per_pss,
            extra={"processes_per_sandbox_p50": statistics.median(per_box)},
        ),
        Metric(
            NAME,
            f"time to start {COUNT} ({AT_ONCE} at a time, info)",
            "s",
            all_up,
            extra={"release_all_seconds": release_seconds, "measure_seconds": measure_seconds},
        ),
        timing(NAME, f"acquire, {AT_ONCE} starting at a time (info)", starts, "ms"),
        Metric(
            NAME,
            "sandbox processes left after the release (waited up to 10 s)",
            "",
            float(len(left)),
            target_op="<=",
            target=0.0,
            extra={"left": [p.pid for p in left][:20]},
        ).check(),
        _directories_row(roots, dirs_left),
    ]


def _directories_row(roots: list[Path], left: list[str]) -> Metric:
    name = "sandbox directories left after the release"
    if len(roots) != COUNT:
        missing = f"{COUNT - len(roots)} sandboxes name no directory"
        return not_measured(NAME, name, "", missing, target_op="<=", target=0.0)
    return Metric(
        NAME,
        name,
        "",
        float(len(left)),
        n=len(roots),
        target_op="<=",
        target=0.0,
        extra={"left": left[:5]},
    ).check()
