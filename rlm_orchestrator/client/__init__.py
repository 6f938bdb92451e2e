"""Python client of the orchestrator service: `Client` (sync) and `AsyncClient`.

from rlm_orchestrator.client import Client

with Client("127.0.0.1:50051", token="...") as client:
    result = client.completion(long_text, "What changed?", model="gpt-4o-mini")
    for event in client.stream(long_text, "What changed?"):
        print(event)
"""

from rlm_orchestrator.client._async import AsyncClient, AsyncSession, CompletionSummary
from rlm_orchestrator.client._sync import Client, Session

__all__ = ["AsyncClient", "AsyncSession", "Client", "CompletionSummary", "Session"]
