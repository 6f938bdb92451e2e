"""The synchronous client: one RLM completion, then the server's models and a plain LM call.

Start a server first (see README.md here), then:

    RLM_SERVER=127.0.0.1:50051 RLM_SERVER_TOKEN=... python examples/sync_client.py

The token comes from RLM_SERVER_TOKEN when `token=` is not given; API keys stay on the server.
"""

from __future__ import annotations

import os

from rlm_orchestrator.client import Client


def main() -> None:
    log = "\n".join(f"line {i}: {'ERROR disk full' if i % 7 == 0 else 'ok'}" for i in range(100))
    # timeout: seconds per call (and to reach the server); a completion's own limit is
    # timeout_seconds. max_retries: re-sends after UNAVAILABLE (never of a completion).
    with Client(os.environ.get("RLM_SERVER", "127.0.0.1:50051"), timeout=30) as client:
        result = client.completion(log, "How many lines report an error?", max_iterations=5)
        print("answer:", result.response)
        usage = result.usage_summary
        print(f"{usage.total_calls} LM calls, ${usage.total_cost:.4f}")

        # The server's LM router: which models it serves, and one LM call without an RLM loop.
        models = client.list_models()
        names = ", ".join(m.name for m in models.models)
        print(f"models: {names} (root {models.root_model}, sub-calls {models.sub_model})")
        reply = client.complete("Say hello in one word.", model=models.sub_model)
        print(f"plain LM call: {reply.text} ({reply.model}, {reply.usage.total_cost:.4f} USD)")


if __name__ == "__main__":
    main()
