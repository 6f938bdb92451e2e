"""A fleet of 4 agent containers on a private Docker network (shared by the tests)."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import OWNER, SANDBOX_IMAGE, require_docker

from rlm_orchestrator.sandbox import SubCallOutcome
from rlm_orchestrator.sandbox.agent_client import AgentClient
from rlm_orchestrator.sandbox.launch import (
    CONTAINER_STATE_DIR,
    CONTAINER_WORKDIR,
    TLS_MOUNT,
    AgentLaunch,
    token_environment,
)
from tests.fakes.certs import TestPKI, make_test_pki

TOKEN = "docker-fleet-token"


@dataclass
class DockerFleet:
    client: Any
    network: Any
    containers: list[Any]
    addresses: list[str]
    pki: TestPKI

    def options(self, **extra: object) -> dict[str, object]:
        return {
            "agents": self.addresses,
            "tls_ca_file": str(self.pki.ca_cert),
            "tls_server_name": "localhost",
            "lease_ttl_seconds": 3.0,
            "unhealthy_seconds": 30.0,
            **extra,
        }


@pytest.fixture(scope="session")
def docker_fleet() -> Iterator[DockerFleet]:
    require_docker()
    import docker

    client = docker.from_env()
    # Outside pytest's private temp tree: the agent (nobody) must traverse to its TLS files.
    tls_dir = Path(tempfile.mkdtemp(prefix="fleet-tls-", dir="/tmp"))
    tls_dir.chmod(0o755)
    pki = make_test_pki(tls_dir)
    for path in tls_dir.iterdir():
        path.chmod(0o644)  # a test key: read by the agent through a read-only mount
    labels = {
        "rlm.managed": "true",
        "rlm.owner": OWNER,
        "rlm.role": "fleet-agent",
        "rlm.expires": str(int(time.time()) + 3600),
    }
    network = client.networks.create(
        f"rlm-fleet-{uuid.uuid4().hex[:8]}", internal=True, labels=labels
    )
    containers = []
    try:
        for n in range(4):
            containers.append(
                client.containers.run(
                    SANDBOX_IMAGE,
                    AgentLaunch(
                        listen="0.0.0.0:50051",
                        workdir=CONTAINER_WORKDIR,
                        state_dir=CONTAINER_STATE_DIR,
                        tls_cert=f"{TLS_MOUNT}/{pki.server_cert.name}",
                        tls_key=f"{TLS_MOUNT}/{pki.server_key.name}",
                        fleet=True,
                        lease_ttl_seconds=3,
                    ).args(),
                    detach=True,
                    name=f"rlm-fleet-agent-{n}-{uuid.uuid4().hex[:6]}",
                    network=network.name,
                    environment=token_environment(TOKEN),
                    labels=labels,
                    read_only=True,
                    tmpfs={"/work": "rw,size=64m,mode=1777"},
                    user="65534:65534",
                    cap_drop=["ALL"],
                    security_opt=["no-new-privileges"],
                    pids_limit=128,
                    mem_limit="256m",
                    init=True,
                    volumes={str(tls_dir): {"bind": TLS_MOUNT, "mode": "ro"}},
                )
            )
        addresses = [f"{_address_of(container, network.name)}:50051" for container in containers]
        yield DockerFleet(client, network, containers, addresses, pki)
    finally:
        for container in containers:
            container.remove(force=True)
        network.remove()
        client.close()
        shutil.rmtree(tls_dir, ignore_errors=True)


def _address_of(container: Any, network: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"].get(network, {}).get("IPAddress")
        if address:
            return str(address)
        time.sleep(0.1)
    raise RuntimeError(f"{container.name} got no address: {container.logs()[-500:]!r}")


async def run(agent: AgentClient, code: str) -> str:
    async def ignore(stream: str, text: str) -> None:
        return None

    async def none(prompts: list[str], model: str, kind: str) -> Sequence[SubCallOutcome]:
        return []

    return (await agent.execute(code, on_output=ignore, on_sub_call=none)).stdout
