"""The fake cluster (tests.fakes.fake_cluster) as a fixture, one per test, and
what the provider's tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_support import run

from rlm_orchestrator.config import KubernetesConfig
from rlm_orchestrator.sandbox.kubernetes import KubernetesProvider
from tests.fakes.certs import TestPKI, make_test_pki
from tests.fakes.fake_cluster import (
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
    "all_gone",
    "eventually",
    "fake_cluster",
    "kube_pki",
    "provider",
    "run",
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


def provider(cluster: FakeCluster, **options: Any) -> KubernetesProvider:
    return KubernetesProvider(KubernetesConfig.model_validate(cluster.options(**options)))


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def all_gone(cluster: FakeCluster) -> None:
    """Every pod gone: a deleted pod stays (Terminating) until the kubelet has stopped it."""
    await eventually(lambda: cluster.pods() == [])
