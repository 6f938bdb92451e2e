"""The fake cluster (rlm_orchestrator.testing.fake_cluster) as a fixture, one per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm_orchestrator.testing.certs import TestPKI, make_test_pki
from rlm_orchestrator.testing.fake_cluster import (
    AGENT_NAME,
    CRASHING_IMAGE,
    NAMESPACE,
    STUCK_IMAGE,
    TOKEN_ENV,
    FakeCluster,
)

__all__ = [
    "CRASHING_IMAGE",
    "NAMESPACE",
    "STUCK_IMAGE",
    "TOKEN",
    "FakeCluster",
    "fake_cluster",
    "kube_pki",
]

TOKEN = "kube-agent-token-for-tests"


@pytest.fixture(scope="session")
def kube_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("kube-pki"), hostname=AGENT_NAME)


@pytest.fixture
def fake_cluster(
    kube_pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeCluster]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with FakeCluster(tmp_path, kube_pki, TOKEN) as cluster:
        yield cluster
