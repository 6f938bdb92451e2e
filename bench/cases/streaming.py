"""Output streaming on the local agent: print-to-arrival latency and flood throughput."""

from __future__ import annotations

import time

from bench.common import Metric, instant_answers, timing
from rlm_orchestrator.sandbox import SandboxSpec
from rlm_orchestrator.sandbox.local import LocalProvider

NAME = "streaming"
DESCRIPTION = "output streaming latency (print -> chunk) and flood throughput"
STAMPS = 100
STAMP_INTERVAL = 0.02
FLOOD_MB = 100
FLOOD_REPEATS = 3

# Each line carries the wall-clock time of its print; arrival is compared on the orchestrator.
LATENCY = f"""
import time
for _ in range({STAMPS}):
    print(repr(time.time()))
    time.sleep({STAMP_INTERVAL})
"""
FLOOD = f"""
_s = 'x' * 999_999
for _ in range({FLOOD_MB}):
    print(_s)
"""


async def run() -> list[Metric]:
    provider = LocalProvider()
    box = await provider.acquire(SandboxSpec(session_id="bench-stream"))
    try:
        latencies: list[float] = []
        chunk_count = 0

        async def on_stamp(stream: str, text: str) -> None:
            nonlocal chunk_count
            arrived = time.time()
            chunk_count += 1
            for line in text.split():
                latencies.append(arrived - float(line))

        report = await box.client.execute(LATENCY, on_output=on_stamp, on_sub_call=instant_answers)
        assert report.status == "ok", report.stderr
        assert len(latencies) == STAMPS, len(latencies)

        rates: list[float] = []
        received = 0

        async def count(stream: str, text: str) -> None:
            nonlocal received
            received += len(text)

        for _ in range(FLOOD_REPEATS):
            received = 0
            start = time.perf_counter()
            report = await box.client.execute(
                FLOOD,
                on_output=count,
                on_sub_call=instant_answers,
                max_output_chars=FLOOD_MB * 1_000_000 + 1000,
            )
            elapsed = time.perf_counter() - start
            assert report.status == "ok" and report.truncated_chars == 0, report.error
            assert received == FLOOD_MB * 1_000_000, received
            rates.append(received / elapsed / 1e6)
        rates.sort()
        latency = timing(NAME, "print -> chunk arrival latency", latencies, "ms", "<", 50.0)
        latency.extra["chunks"] = chunk_count
        flood = Metric(
            NAME,
            f"flood throughput, {FLOOD_MB} MB of print() received",
            "MB/s",
            rates[len(rates) // 2],
            n=len(rates),
            target_op=">=",
            target=50.0,
            extra={"runs_mb_per_s": rates},
        ).check()
        return [latency, flood]
    finally:
        await provider.aclose()
