"""A whole fake cluster for environment="kubernetes": API server, kubelet, Secrets.

The fake API server (fake_kube.py) served over real HTTP on 127.0.0.1 with a kubeconfig for
it, the fake kubelet (fake_kubelet.py) running each pod as a real agent on a loopback address
of its own, and the Secrets the provider's pods reference (the agents' TLS certificate from a
throwaway PKI, and their token). Used by the tests and the benchmarks.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from rlm_orchestrator.sandbox.launch import TOKEN_ENV as TOKEN_ENV  # re-exported for tests
from tests.fakes.certs import TestPKI, make_test_pki
from tests.fakes.fake_kube import FakeKubeApiServer
from tests.fakes.fake_kube_http import FakeKubeHttpServer
from tests.fakes.fake_kubelet import AGENT, CRASHES, NEVER_READY, FakeKubelet

NAMESPACE = "rlm-sandboxes"
AGENT_NAME = "rlm-agent.rlm-sandboxes.svc"  # the name the agents' certificate carries
IMAGE = "rlm-sandbox:latest"
STUCK_IMAGE = "rlm-sandbox:stuck"  # "pulled", but its container never gets created
CRASHING_IMAGE = "rlm-sandbox:crashing"  # its container exits at once (code 3)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class FakeCluster:
    """Start with `with FakeCluster(root) as cluster:`; set os.environ[TOKEN_ENV] = token."""

    def __init__(self, root: Path, pki: TestPKI | None = None, token: str = "agent-token"):
        self.root = root
        self.pki = pki or make_test_pki(root / "pki", hostname=AGENT_NAME)
        self.token = token
        self.api_server = FakeKubeApiServer()
        self.kubelet = FakeKubelet(
            self.api_server,
            root / "kubelet",
            images={IMAGE: AGENT, STUCK_IMAGE: NEVER_READY, CRASHING_IMAGE: CRASHES},
        )
        self.http = FakeKubeHttpServer(self.api_server)
        # Every pod listens on these, each on its own address (as pods do).
        self.port, self.health_port = _free_port(), _free_port()
        self.kubeconfig = root / "kubeconfig"
        self._secrets()

    def _secrets(self) -> None:
        secrets = {
            "rlm-agent-token": {"token": self.token.encode()},
            "rlm-agent-tls": {
                "tls.crt": self.pki.server_cert.read_bytes(),
                "tls.key": self.pki.server_key.read_bytes(),
            },
        }
        for name, data in secrets.items():
            self.api_server.create(
                "Secret",
                NAMESPACE,
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name},
                    "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
                },
            )

    def __enter__(self) -> FakeCluster:
        self.http.start()
        self.http.write_kubeconfig(self.kubeconfig, namespace=NAMESPACE)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kubelet.close()
        self.http.stop()

    def options(self, **extra: Any) -> dict[str, Any]:
        """environment_kwargs for environment="kubernetes" against this cluster."""
        return {
            "kubeconfig": str(self.kubeconfig),
            "namespace": NAMESPACE,
            "port": self.port,
            "health_port": self.health_port,
            "tls_ca_file": str(self.pki.ca_cert),
            "tls_server_name": AGENT_NAME,
            "token_env": TOKEN_ENV,
            **extra,
        }

    def pods(self) -> list[dict[str, Any]]:
        return self.api_server.list("Pod", NAMESPACE)[0]

    def leases(self) -> list[dict[str, Any]]:
        return self.api_server.list("Lease", NAMESPACE)[0]
