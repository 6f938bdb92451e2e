"""Python client of the orchestrator service: `Client` (sync) and `AsyncClient`.

from rlm_orchestrator.client import Client

with Client("127.0.0.1:50051", token="...") as client:  # token: else $RLM_SERVER_TOKEN
    result = client.completion(long_text, "What changed?", model="gpt-4o-mini")
    for event in client.stream(long_text, "What changed?"):
        print(event)
    print(client.complete("Say hi", model="gpt-4o-mini").text)  # one LM call, no RLM loop
"""

from rlm_orchestrator.client._async import AsyncClient, AsyncSession, CompletionSummary
from rlm_orchestrator.client._options import CompletionOptions
from rlm_orchestrator.client._router import LMBatch, LMCompletion, ModelInfo, ModelList
from rlm_orchestrator.client._sync import Client, Session
from rlm_orchestrator.exceptions import (
    AuthenticationError,
    ClientError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    ServerShutdownError,
    ServerUnavailableError,
)

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "AuthenticationError",
    "Client",
    "ClientError",
    "CompletionOptions",
    "CompletionSummary",
    "InvalidRequestError",
    "LMBatch",
    "LMCompletion",
    "ModelInfo",
    "ModelList",
    "NotFoundError",
    "ResourceExhaustedError",
    "ServerShutdownError",
    "ServerUnavailableError",
    "Session",
]
