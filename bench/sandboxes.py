"""Idle local sandboxes for the memory rows: started through `LocalProvider` (a bounded number
at a time), every process of theirs found, their memory summed, and a check that none of them
outlives the release.

A sandbox's processes are found two ways, united: the agent's and the worker's process trees
(as the provider reports them), and every process carrying this run's owner label (the
`RLM_SANDBOX_OWNER` variable every local sandbox inherits), which also finds processes that are
not descendants of the agent (a fork server's children, a double fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from rlm_orchestrator.sandbox import Sandbox, SandboxSpec
from rlm_orchestrator.sandbox.local import OWNER_ENV, LocalProvider

MB = 1024 * 1024


@contextlib.contextmanager
def owner_label() -> Iterator[str]:
    """A label unique to this run, given to every local sandbox started inside the block."""
    label = f"rlm-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    previous = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = label
    try:
        yield label
    finally:
        if previous is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = previous


def labelled(label: str) -> dict[int, psutil.Process]:
    """Every process on this machine that carries `label`."""
    found = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # ended, or not ours to read
            if process.environ().get(OWNER_ENV) == label:
                found[process.pid] = process
    return found


def _children_map() -> dict[int, list[int]]:
    """Every process's children, from one pass over the process table (psutil's
    `children()` makes a pass per call: too slow for hundreds of sandboxes)."""
    children: dict[int, list[int]] = {}
    for process in psutil.process_iter(["ppid"]):
        children.setdefault(process.info["ppid"], []).append(process.pid)
    return children


def processes_of(boxes: list[Sandbox]) -> list[dict[int, psutil.Process]]:
    """Per sandbox: the agent and every process under it, and the worker (which leads its
    own group) with every process under it."""
    children = _children_map()
    found = []
    for box in boxes:
        state: Any = box.provider_state
        pending = [getattr(getattr(state, "process", None), "pid", 0)]
        pending.append(getattr(state, "worker_pid", 0))
        mine: dict[int, psutil.Process] = {}
        while pending:
            pid = pending.pop()
            if not pid or pid in mine:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                mine[pid] = psutil.Process(pid)
            pending.extend(children.get(pid, ()))
        if not mine:
            raise RuntimeError(f"no process found for sandbox {box.sandbox_id}")
        found.append(mine)
    return found


def directory_of(box: Sandbox) -> Path | None:
    """The sandbox's own directory on the host (its socket, work dir, log), if it names one."""
    root = getattr(box.provider_state, "root", None)
    return root if isinstance(root, Path) else None


@dataclass
class Memory:
    """Summed over a set of processes, in MB. PSS splits each shared page between the
    processes that map it (the agent and its worker share most of theirs), so a sum of PSS
    counts every page once; a sum of RSS counts a shared page once per process."""

    rss: float
    uss: float
    pss: float
    processes: int


def memory(processes: Iterable[psutil.Process]) -> Memory:
    """Raises psutil.AccessDenied (or AttributeError off Linux) where USS/PSS cannot be read:
    the row is then not measured."""
    rss = uss = pss = 0
    count = 0
    for process in processes:
        try:
            full = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss, uss, pss = rss + full.rss, uss + full.uss, pss + full.pss
        count += 1
    return Memory(rss / MB, uss / MB, pss / MB, count)


async def start_idle(
    provider: LocalProvider, boxes: list[Sandbox], count: int, at_once: int, prefix: str
) -> list[float]:
    """`count` sandboxes acquired into `boxes` (which keeps them if one fails), at most
    `at_once` starting at a time; each one's acquire time (s)."""
    gate = asyncio.Semaphore(at_once)
    seconds: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            box = await provider.acquire(SandboxSpec(session_id=f"{prefix}-{i}"))
            seconds.append(time.perf_counter() - start)
            boxes.append(box)

    # A failed start cancels the others (and the group waits for them): none is left starting.
    async with asyncio.TaskGroup() as group:
        for i in range(count):
            group.create_task(one(i))
    return seconds


async def release_all(provider: LocalProvider, boxes: list[Sandbox], at_once: int) -> None:
    """`boxes` released, `at_once` at a time (the provider's `aclose()` releases one after the
    other), then the provider closed (which releases any other)."""
    gate = asyncio.Semaphore(at_once)

    async def one(box: Sandbox) -> None:
        async with gate:
            await provider.release(box)

    try:
        await asyncio.gather(*(one(box) for box in boxes), return_exceptions=True)
    finally:
        await provider.aclose()


async def survivors(
    label: str, seen: Iterable[psutil.Process], timeout: float = 10.0
) -> list[psutil.Process]:
    """The sandbox processes still running `timeout` seconds after the release (none, when
    nothing leaks): those carrying `label`, and those `seen` before the release."""
    known = list(seen)
    deadline = time.monotonic() + timeout
    while True:
        left = {p.pid: p for p in known if _alive(p)}
        left.update(await asyncio.to_thread(labelled, label))
        if not left or time.monotonic() > deadline:
            return list(left.values())
        await asyncio.sleep(0.1)


def _alive(process: psutil.Process) -> bool:
    try:
        # is_running() also compares the start time: a reused pid is not the same process.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
