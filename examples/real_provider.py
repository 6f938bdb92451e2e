"""A real provider, in process and through a server. Needs OPENAI_API_KEY (and network);
not run by the tests, only type-checked.

    OPENAI_API_KEY=sk-... python examples/real_provider.py

Through a server, the key lives in the server's environment only (examples/server.toml):
    OPENAI_API_KEY=sk-... RLM_SERVER_AUTH_TOKEN=change-me \\
        rlm-orchestrator serve --config examples/server.toml
    RLM_SERVER_TOKEN=change-me RLM_SERVER=127.0.0.1:50051 python examples/real_provider.py
"""

from __future__ import annotations

import os

from rlm_orchestrator import RLM
from rlm_orchestrator.client import Client

CONTEXT = "\n".join(f"Day {n}: sold {n * 37 % 101} apples." for n in range(1, 366))
QUESTION = "On which day were the most apples sold, and how many?"


def main() -> None:
    server = os.environ.get("RLM_SERVER")
    if server:
        with Client(server) as client:  # models by the names in the server's config
            result = client.completion(CONTEXT, QUESTION, model="big", max_cost=0.50)
    else:
        rlm = RLM(
            backend="openai",
            backend_kwargs={"model_name": "gpt-4o"},  # the key: OPENAI_API_KEY
            other_backends=["openai"],
            other_backend_kwargs=[{"model_name": "gpt-4o-mini"}],
            max_cost=0.50,  # USD, sub-calls included
        )
        result = rlm.completion(CONTEXT, root_prompt=QUESTION)
    print(result.response)
    print(f"${result.usage_summary.total_cost:.4f}, {result.execution_time:.1f}s")


if __name__ == "__main__":
    main()
