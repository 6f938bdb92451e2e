"""The in-process RLM against any OpenAI-compatible server (vLLM, llama.cpp, Ollama, LM Studio).

    python examples/custom_openai_server.py                      # a scripted stand-in, offline
    LM_BASE_URL=http://localhost:11434/v1 LM_MODEL=llama3.1 python examples/custom_openai_server.py

Without LM_BASE_URL it starts the scripted OpenAI-compatible server of
`rlm_orchestrator.testing` (canned answers, no network, no key), so that it runs anywhere.
A server that needs no key still gets one (`api_key`): any string does.
"""

from __future__ import annotations

import contextlib
import os

from rlm_orchestrator import RLM
from rlm_orchestrator.testing.scripted_lm import Rule, Script, ScriptedLMServer

CONTEXT = "\n".join(f"order {n}: {'refunded' if n % 4 == 0 else 'shipped'}" for n in range(1, 41))
QUESTION = "How many orders were refunded?"

# What the scripted stand-in answers: a root turn that counts with code, then the answer;
# sub-calls (llm_query) get a fixed reply.
STAND_IN = Script(
    rules=[Rule("(a sub-model's reply)", model="sub-model")],
    sequences={
        "root-model": [
            "```repl\nrefunded = str(context.count('refunded'))\nprint(refunded)\n```",
            "FINAL_VAR(refunded)",
        ]
    },
)


def main() -> None:
    with contextlib.ExitStack() as stack:
        base_url = os.environ.get("LM_BASE_URL")
        root_model = os.environ.get("LM_MODEL", "root-model")
        sub_model = os.environ.get("LM_SUB_MODEL", root_model if base_url else "sub-model")
        if base_url is None:
            base_url = stack.enter_context(ScriptedLMServer(STAND_IN)).base_url
        common = {"api_base": base_url, "api_key": os.environ.get("LM_API_KEY", "not-needed")}
        rlm = RLM(
            backend="openai",  # the OpenAI wire format, at api_base
            backend_kwargs={"model_name": root_model, **common},
            other_backends=["openai"],  # the sub-call model (llm_query)
            other_backend_kwargs=[{"model_name": sub_model, **common}],
            environment="local",  # code runs in a local sandbox process
            max_iterations=5,
        )
        result = rlm.completion(CONTEXT, root_prompt=QUESTION)
    print("answer:", result.response)
    print(f"{result.usage_summary.total_calls} LM calls in {result.execution_time:.2f}s")


if __name__ == "__main__":
    main()
