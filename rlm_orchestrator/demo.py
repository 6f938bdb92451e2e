"""The offline demo behind `make run`: a real RLM run whose *model* is scripted.

A 1.5 M-character context hides one fact. A scripted root model (no API key, no network)
drives a real strategy: look at the context, split it into chunks, ask sub-LMs about every
chunk at once with llm_query_batched, aggregate, answer with FINAL_VAR. The code really runs
in a sandbox agent process, the sub-calls really travel back over the gRPC stream and
through litellm over HTTP to the scripted server on 127.0.0.1.
"""

from __future__ import annotations

import random
import string

from rlm_orchestrator.testing.scripted_lm import Rule, Script

SECRET = "7-ALPHA-42"
ROOT_MODEL, SUB_MODEL = "demo-root", "demo-sub"


def make_context(size: int = 1_500_000, seed: int = 7) -> str:
    """Filler sentences with one needle at a random place."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(500)]
    sentences: list[str] = []
    total = 0
    while total < size:
        sentence = " ".join(rng.choices(words, k=12)).capitalize() + ". "
        sentences.append(sentence)
        total += len(sentence)
    sentences.insert(rng.randrange(len(sentences)), f"The secret launch code is {SECRET}. ")
    return "".join(sentences)


def _repl(code: str) -> str:
    return f"```repl\n{code.strip()}\n```"


ROOT_TURNS = [
    "First I will look at the shape of the context.\n"
    + _repl("print(type(context).__name__, len(context))\nprint(context[:200])"),
    "The context is one long string. I will split it into 15 chunks and ask a sub-LM about "
    "each chunk concurrently.\n"
    + _repl("""
size = len(context) // 15 + 1
chunks = [context[i:i + size] for i in range(0, len(context), size)]
question = "Find the secret launch code in this text. Answer NONE if it is absent."
prompts = [f"{question}\\n{chunk}" for chunk in chunks]
findings = llm_query_batched(prompts)
for i, finding in enumerate(findings):
    print(f"chunk {i}: {finding}")
"""),
    "One chunk found it. I will ask a sub-LM to aggregate the findings into the answer.\n"
    + _repl("""
answer = llm_query("Findings:\\n" + "\\n".join(findings) + "\\nWhat is the secret launch code?")
print(answer)
"""),
    "FINAL_VAR(answer)",
]


def demo_script() -> Script:
    return Script(
        rules=[
            Rule(
                r"The secret launch code is \1.",
                model=SUB_MODEL,
                regex=r"^Findings:.*FOUND: ([\w-]+)",
            ),
            Rule(r"FOUND: \1", model=SUB_MODEL, regex=r"secret launch code is ([\w-]+)\."),
            Rule("NONE", model=SUB_MODEL),
        ],
        sequences={ROOT_MODEL: list(ROOT_TURNS)},
    )
