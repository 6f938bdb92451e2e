"""The asyncio client: several completions at once, each in a sandbox of its own on the server.

RLM_SERVER=127.0.0.1:50051 RLM_SERVER_TOKEN=... python examples/async_client.py
"""

from __future__ import annotations

import asyncio
import os

from rlm_orchestrator.client import AsyncClient

DOCUMENTS = {
    "fox": "the quick brown fox jumps over the lazy dog",
    "lorem": "lorem ipsum dolor sit amet",
    "hello": "hello world",
}


async def main() -> None:
    async with AsyncClient(os.environ.get("RLM_SERVER", "127.0.0.1:50051")) as client:
        results = await asyncio.gather(
            *(
                client.completion(text, "Return the text in upper case.", max_iterations=3)
                for text in DOCUMENTS.values()
            )
        )
    for name, result in zip(DOCUMENTS, results, strict=True):
        print(f"{name}: {result.response} ({result.execution_time:.2f}s)")


if __name__ == "__main__":
    asyncio.run(main())
