"""Run the benchmarks: `python -m bench.run [--only NAME ...]` (or `make bench [BENCH=NAME]`).

Writes bench/results/<timestamp>.json and bench/results/latest.json and prints a markdown
table. Exits 3 when the run is incomplete: a benchmark crashed, or a row that applies here has
no value (its reason on stderr; a row whose requirement is absent here, such as Docker rows
without an engine, says "not applicable" and does not count); else 1 when a target is missed
(saying by how much); else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Metric, machine
from bench.plot import plot
from bench.table import fmt, rows

CASES = {
    "exec": "bench.cases.exec_roundtrip",
    "llm_query": "bench.cases.llm_query",
    "streaming": "bench.cases.streaming",
    "acquire": "bench.cases.acquire",
    "startup": "bench.cases.startup",
    "scale": "bench.cases.scale",
    "recursion": "bench.cases.recursion",
    "idle": "bench.cases.idle",
    "router": "bench.cases.router",
    "fanout": "bench.cases.fanout",
    "journal": "bench.cases.journal",
    "replay": "bench.cases.replay",
}
RESULTS = Path(__file__).resolve().parent / "results"
INCOMPLETE = 3


async def run_case(name: str) -> tuple[list[Metric], float, str]:
    module = importlib.import_module(CASES[name])
    start = time.perf_counter()
    error = ""
    try:
        metrics: list[Metric] = await module.run()
    except Exception:
        error = traceback.format_exc()
        metrics = [Metric(name, "(benchmark crashed)", "", None, note=error.splitlines()[-1])]
    return metrics, time.perf_counter() - start, error


async def main(only: list[str]) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    names = only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "benchmarks": {},
        "metrics": [],
    }
    all_metrics: list[Metric] = []
    for name in names:
        print(f"== {name}: {importlib.import_module(CASES[name]).DESCRIPTION}", file=sys.stderr)
        metrics, seconds, error = await run_case(name)
        if error:
            print(error, file=sys.stderr)
        print(f"   {seconds:.1f}s", file=sys.stderr)
        report["benchmarks"][name] = {"seconds": round(seconds, 2), "error": error or None}
        all_metrics.extend(metrics)
    report["metrics"] = [m.as_dict() for m in all_metrics]
    report["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    report["loadavg_end"] = list(os.getloadavg())  # was the machine shared during the run?
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(report, indent=2)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    suffix = "" if not only else "-" + "-".join(names)
    (RESULTS / f"{stamp}{suffix}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    m = report["machine"]
    chart = plot(all_metrics, RESULTS / f"{stamp}{suffix}.png", f"{stamp}: {m['cores']} cores")
    if chart is not None:
        (RESULTS / "latest.png").write_bytes(chart.read_bytes())

    print()
    print(rows(report["metrics"]))
    print()
    print(
        f"{m['cores']} cores, Python {m['python']}, grpcio {m['grpcio']}, "
        f"Docker {m['docker_server']}; {report['seconds']}s; "
        f"results in bench/results/{stamp}{suffix}.json"
    )
    return verdict(all_metrics, report["benchmarks"])


def verdict(metrics: list[Metric], benchmarks: dict[str, Any]) -> int:
    """The exit status, with every reason on stderr."""
    missed = [x for x in metrics if x.passed is False]
    unmeasured = [x for x in metrics if x.value is None and x.applicable]
    crashed = [n for n, b in benchmarks.items() if b["error"]]
    for x in metrics:
        if not x.applicable:
            reason = x.note.removeprefix("not applicable: ")
            print(f"NOT APPLICABLE: {x.bench} / {x.name}: {reason}", file=sys.stderr)
    for x in missed:
        print(
            f"MISSED: {x.bench} / {x.name}: {fmt(x.value)} {x.unit}, "
            f"target {x.target_op} {fmt(x.target)} {x.unit}: {x.miss}",
            file=sys.stderr,
        )
    for x in unmeasured:
        reason = x.note.removeprefix("not measured: ")
        print(f"NOT MEASURED: {x.bench} / {x.name}: {reason}", file=sys.stderr)
    for n in crashed:
        print(f"CRASHED: {n} (traceback above)", file=sys.stderr)
    if unmeasured or crashed:
        return INCOMPLETE
    return 1 if missed else 0


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", action="append", default=[], help=f"one of {', '.join(CASES)} (repeatable)"
    )
    args = parser.parse_args()
    only = [n for item in args.only for n in item.replace(",", " ").split()]
    raise SystemExit(asyncio.run(main(only)))


if __name__ == "__main__":
    cli()
