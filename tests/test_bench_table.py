"""The README's benchmark figures come from one committed results file, and a run that could
not measure what applies on its machine fails (bench/README.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench import table  # noqa: E402
from bench.common import Metric, not_applicable, not_measured  # noqa: E402
from bench.run import INCOMPLETE, verdict  # noqa: E402


def test_the_readme_table_is_what_its_named_results_file_gives() -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(table.BEGIN) + len(table.BEGIN), readme.index(table.END)
    section = readme[start:end].lstrip("\n")
    named = re.search(r"From `(bench/results/[^`]+\.json)`", section)
    assert named, "the README's bench table names no results file"
    results = ROOT / named.group(1)
    assert results.is_file(), f"{named.group(1)} is not in the repository"
    assert section == table.render(results), (
        f"the README's bench table is not {named.group(1)}'s: "
        f"python -m bench.table {named.group(1)} --readme README.md"
    )


def _run(*metrics: Metric, crashed: bool = False) -> int:
    return verdict(list(metrics), {"case": {"error": "Traceback ..." if crashed else None}})


def test_a_row_without_its_requirement_does_not_fail_the_run() -> None:
    passed = Metric("b", "ok", "ms", 1.0, target_op="<", target=2.0).check()
    absent = not_applicable("b", "docker", "ms", "no Docker engine", target_op="<", target=2.0)
    assert _run(passed, absent) == 0
    assert "not applicable: no Docker engine" in table.rows([absent.as_dict()])


def test_a_row_that_applies_but_has_no_value_fails_the_run() -> None:
    passed = Metric("b", "ok", "ms", 1.0, target_op="<", target=2.0).check()
    missed = Metric("b", "slow", "ms", 3.0, target_op="<", target=2.0).check()
    broken = not_measured("b", "docker", "ms", "image not found")
    assert _run(passed, missed) == 1
    assert _run(passed, missed, broken) == INCOMPLETE
    assert _run(passed, crashed=True) == INCOMPLETE
    assert "**not measured: image not found**" in table.rows([broken.as_dict()])


def test_a_count_that_must_be_zero_is_missed_by_how_many() -> None:
    clean = Metric("idle", "processes left", "", 0.0, target_op="<=", target=0.0).check()
    leaked = Metric("idle", "processes left", "", 3.0, target_op="<=", target=0.0).check()
    assert _run(clean) == 0
    assert leaked.miss == "3 over the target of 0"
    assert _run(clean, leaked) == 1
    assert "| 0 | — |  |  | <= 0 | pass |" in table.rows([clean.as_dict()])
    assert "| <= 0 | **MISS** (3 over the target of 0) |" in table.rows([leaked.as_dict()])
