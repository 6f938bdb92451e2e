"""Watching a completion as it runs: turns, code, output and sub-calls, then the answer.

    RLM_SERVER=127.0.0.1:50051 RLM_SERVER_TOKEN=... python examples/streaming_events.py

Leaving the loop early (break, an exception, Ctrl-C) cancels the completion on the server.
"""

from __future__ import annotations

import os

from rlm_orchestrator import events as ev
from rlm_orchestrator.client import Client

CONTEXT = " ".join(f"Chapter {n}: the hero travels to city number {n}." for n in range(1, 200))


def main() -> None:
    with Client(os.environ.get("RLM_SERVER", "127.0.0.1:50051")) as client:
        for event in client.stream(CONTEXT, "Summarise the story in one sentence."):
            indent = "  " * getattr(event, "depth", 0)
            match event:
                case ev.CompletionStarted(completion_id=completion_id):
                    print(f"started {completion_id}")
                case ev.TurnStarted(iteration=turn):
                    print(f"{indent}-- turn {turn}")
                case ev.CodeBlockStarted(block=block, code=code):
                    print(f"{indent}block {block + 1}:\n{code}")
                case ev.OutputChunk(text=text):
                    print(f"{indent}| {text}", end="" if text.endswith("\n") else "\n")
                case ev.SubCallStarted(kind=kind, model=model, prompt_chars=chars):
                    print(f"{indent}{kind} -> {model} ({chars} characters)")
                case ev.UsageUpdated(usage=usage):
                    print(f"{indent}spent so far: ${usage.total_cost:.4f}")
                case ev.CompletionFinished(result=result, iterations=turns):
                    print(f"answer after {turns} turn(s): {result.response}")
                case ev.CompletionFailed(kind=kind, message=message):
                    print(f"failed ({kind}): {message}")


if __name__ == "__main__":
    main()
