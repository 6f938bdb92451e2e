"""Skips: in CI a skipped test fails; elsewhere it skips, with its reason.

CI (`CI=true`, as `.ci/run` runs) has everything the suite needs: `make test` installs the dev
extras (modal, lightkube, kubernetes-validate, kubectl, PyYAML, psycopg) and, under CI, the
system tools (`.ci/install-test-tools`: openssl, util-linux, docker-compose, postgresql, chromium,
Debian's python3.X). A skip there means an install step broke, so it fails: "skipped in CI:
<reason>". On a workstation, a missing optional tool still skips with its reason.

What can never apply is not a skip, anywhere:
- not generated: a semantics test marked `not_through_server(why)` has no [server] variant;
- deselected: the live Modal test (`modal_live`) unless RLM_MODAL_LIVE=1, and the real-model
  tests (`real_model`, `make test-real-model`) unless RLM_REAL_MODEL=1;
- `not_applicable(why)`: a documented, permanent case whose skip stays a skip in CI (no test
  needs it today).
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest
from _pytest.reports import BaseReport

# Markers of tests that run only when their variable is 1 (else they are deselected).
OPT_IN = {"modal_live": "RLM_MODAL_LIVE", "real_model": "RLM_REAL_MODEL"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _reason(report: BaseReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, message = longrepr
        return f"{str(message).removeprefix('Skipped: ')} ({path}:{line})"
    return str(longrepr)


def _fail(report: BaseReport) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped in CI: {_reason(report)}"


def pytest_configure(config: pytest.Config) -> None:
    """The hook that turns the policy on (conftest.py imports it)."""
    config.addinivalue_line(
        "markers", "not_applicable(why): a documented, permanent case: its skip stays a skip in CI"
    )
    config.pluginmanager.register(SkipPolicy(ci=in_ci()), "rlm-skip-policy")


class SkipPolicy:
    def __init__(self, ci: bool) -> None:
        self.ci = ci

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        opted_out = [
            marker for marker, variable in OPT_IN.items() if os.environ.get(variable) != "1"
        ]
        out = {id(i) for i in items if any(i.get_closest_marker(m) for m in opted_out)}
        if out:
            config.hook.pytest_deselected(items=[i for i in items if id(i) in out])
            items[:] = [i for i in items if id(i) not in out]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if (
            self.ci
            and report.skipped
            and not hasattr(report, "wasxfail")
            and item.get_closest_marker("not_applicable") is None
        ):
            _fail(report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        report = yield  # a module skipped whole: importorskip, or a skip at import
        if self.ci and report.skipped:
            _fail(report)
        return report
