"""A fake Modal control plane whose sandboxes really run (shared by the tests).

`modal_agents` gives the fake a runtime: each sandbox the provider creates runs its entrypoint
(the provider's own `command()`, every flag) as a real process, and the fake's h2 tunnel
terminates TLS with a test CA's certificate in front of it, as Modal's edge does.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import modal
import pytest
from modal_proto import api_pb2

from tests.fakes.certs import TestPKI, make_test_pki
from tests.fakes.fake_modal import FakeModal, SandboxRuntime, reset_modal_client


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ModalAgents:
    """The fake, its runtime and the CA its tunnels' certificate comes from."""

    fake: FakeModal
    runtime: SandboxRuntime
    pki: TestPKI

    @property
    def tokens(self) -> list[str]:
        """The bearer tokens the sandboxes got (from the provider's secret), in order."""
        containers = self.runtime.containers.values()
        return [c.env["RLM_AGENT_TOKEN"] for c in containers if "RLM_AGENT_TOKEN" in c.env]


async def close_modal_client() -> None:
    """Close and forget the client `modal.Client.from_env` cached (before the env changes)."""
    from modal.client import _Client

    if _Client._client_from_env is not None:
        # Bounded: a wrong setup must fail, not wait for modal's minute of retries.
        client = await asyncio.wait_for(modal.Client.from_env.aio(), 10)
        await asyncio.wait_for(client.close.aio(), 10)
    reset_modal_client()


@pytest.fixture
async def fake_modal(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeModal]:
    async with FakeModal() as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        reset_modal_client()
        try:
            yield fake
        finally:
            await close_modal_client()


@pytest.fixture
def modal_agents(fake_modal: FakeModal, tmp_path: Path) -> Iterator[ModalAgents]:
    pki = make_test_pki(tmp_path / "pki")
    runtime = SandboxRuntime(
        tmp_path / "sandboxes",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        # The run's label, for its leak checks of agent processes.
        extra_env={"RLM_SANDBOX_OWNER": os.environ["RLM_SANDBOX_OWNER"]},
    )
    fake_modal.runtime = runtime
    # The image's local source (our agent) is uploaded as a mount: accept every file.
    uploaded: list[str] = []
    fake_modal.set_handler(
        "MountBatchedCheckExistence",
        lambda r: api_pb2.MountBatchedCheckExistenceResponse(
            missing_sha256_hex_hashes=list(r.sha256_hex_hashes)
        ),
    )
    fake_modal.set_handler(
        "MountPutFile",
        lambda r: uploaded.append(r.sha256_hex) or api_pb2.MountPutFileResponse(exists=True),
    )
    fake_modal.set_handler(
        "MountGetOrCreate",
        lambda r: api_pb2.MountGetOrCreateResponse(
            mount_id="mo-agent",
            handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex="0" * 64),
        ),
    )
    yield ModalAgents(fake_modal, runtime, pki)
