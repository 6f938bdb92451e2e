"""The skip policy (tests/skip_policy.py) in a pytest run of its own: in CI a skip fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DEMO = """
import pytest


def test_needs_a_missing_tool():
    pytest.skip("needs the frobnicate tool")


@pytest.mark.not_applicable("documented: no such thing on this kind of machine")
def test_documented_not_applicable():
    pytest.skip("cannot apply here")


@pytest.mark.modal_live
def test_live():
    raise AssertionError("runs only with RLM_MODAL_LIVE=1")


@pytest.mark.real_model
def test_real_model():
    raise AssertionError("runs only with RLM_REAL_MODEL=1 (make test-real-model)")


def test_passes():
    pass
"""


def run_demo(directory: Path, ci: str | None) -> str:
    (directory / "conftest.py").write_text("from skip_policy import pytest_configure\n")
    (directory / "test_demo.py").write_text(DEMO)
    (directory / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n  modal_live: live\n  real_model: real\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in {"CI", "RLM_MODAL_LIVE", "RLM_REAL_MODEL"}
    }
    env["PYTHONPATH"] = str(TESTS)
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(directory)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout


def test_outside_ci_a_skip_skips_with_its_reason(tmp_path: Path) -> None:
    out = run_demo(tmp_path, ci=None)
    assert "1 passed, 2 skipped, 2 deselected" in out, out
    assert "needs the frobnicate tool" in out


def test_in_ci_a_skip_fails_unless_documented_not_applicable(tmp_path: Path) -> None:
    out = run_demo(tmp_path, ci="true")
    assert "1 failed, 1 passed, 1 skipped, 2 deselected" in out, out
    assert "skipped in CI: needs the frobnicate tool" in out
    assert "cannot apply here" in out  # the not_applicable one: still a skip
