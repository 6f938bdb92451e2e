"""A fake cluster for the Kubernetes provider: the fake API server over real HTTP, a fake
kubelet running each pod as a real agent on its own loopback address, and the Secrets the
pods reference (the agents' TLS certificate and token)."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rlm_orchestrator.testing.certs import TestPKI, make_test_pki
from rlm_orchestrator.testing.fake_kube import FakeKubeApiServer
from rlm_orchestrator.testing.fake_kube_http import FakeKubeHttpServer
from rlm_orchestrator.testing.fake_kubelet import NEVER_READY, FakeKubelet

NAMESPACE = "rlm-sandboxes"
AGENT_NAME = "rlm-agent.rlm-sandboxes.svc"
TOKEN = "kube-agent-token-for-tests"
STUCK_IMAGE = "rlm-sandbox:stuck"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class FakeCluster:
    api_server: FakeKubeApiServer
    http: FakeKubeHttpServer
    kubelet: FakeKubelet
    kubeconfig: Path
    pki: TestPKI
    port: int
    health_port: int

    def options(self, **extra: Any) -> dict[str, Any]:
        """environment_kwargs for environment="kubernetes" against this cluster."""
        return {
            "kubeconfig": str(self.kubeconfig),
            "namespace": NAMESPACE,
            "port": self.port,
            "health_port": self.health_port,
            "tls_ca_file": str(self.pki.ca_cert),
            "tls_server_name": AGENT_NAME,
            "token_env": "RLM_SANDBOX_TOKEN",
            **extra,
        }

    def pods(self) -> list[dict[str, Any]]:
        return list(self.api_server.list("Pod", NAMESPACE)[0])

    def leases(self) -> list[dict[str, Any]]:
        return list(self.api_server.list("Lease", NAMESPACE)[0])


@pytest.fixture(scope="session")
def kube_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("kube-pki"), hostname=AGENT_NAME)


@pytest.fixture
def fake_cluster(
    kube_pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeCluster]:
    api_server = FakeKubeApiServer()
    for name, data in {
        "rlm-agent-token": {"token": TOKEN.encode()},
        "rlm-agent-tls": {
            "tls.crt": kube_pki.server_cert.read_bytes(),
            "tls.key": kube_pki.server_key.read_bytes(),
        },
    }.items():
        api_server.create(
            "Secret",
            NAMESPACE,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name},
                "data": {key: _b64(value) for key, value in data.items()},
            },
        )
    kubelet = FakeKubelet(
        api_server,
        tmp_path / "kubelet",
        images={"rlm-sandbox:latest": "agent", STUCK_IMAGE: NEVER_READY},
    )
    monkeypatch.setenv("RLM_SANDBOX_TOKEN", TOKEN)
    with FakeKubeHttpServer(api_server) as http:
        kubeconfig = http.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
        try:
            yield FakeCluster(
                api_server, http, kubelet, kubeconfig, kube_pki, _free_port(), _free_port()
            )
        finally:
            kubelet.close()
