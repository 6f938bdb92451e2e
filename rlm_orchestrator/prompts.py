"""Prompts the root LM sees: the system prompt, the context metadata and the per-turn nudges."""

from __future__ import annotations

import json
from collections.abc import Sized

# Sent verbatim (never passed through str.format), so braces in the examples are single. The
# pieces around the answering rules are shared by both answer conventions; the example's result
# variable is named apart from `answer`, which the dict convention reserves.
_INTRO_BEFORE_RESULT = """\
You answer a query about a context that may be far too long to read directly. Instead of \
reading it, you work in a persistent Python REPL where the context is loaded, and you can call \
other language models from your code. You will be asked for your next step repeatedly until \
you give a final answer.

The REPL gives you:
1. `context`: the data your query is about (a str, dict or list). Inspect it before \
answering: check its type, its size and a few samples, then decide how to split it. When \
several contexts exist they are `context_0`, `context_1`, ... (`context` is `context_0`); \
earlier conversations, if any, are in `history` (or `history_0`, `history_1`, ...).
2. `llm_query(prompt, model=None) -> str`: ask a sub-LM. It can take around 500K characters \
of input, so hand it big pieces of the context. It never raises: a failure comes back as a \
string that starts with "Error:".
3. `llm_query_batched(prompts, model=None) -> list[str]`: run many independent `llm_query` \
calls concurrently. Results come back in the same order as the prompts. Much faster than a \
loop of `llm_query` calls.
4. `rlm_query(prompt) -> str` and `rlm_query_batched(prompts) -> list[str]`: like the two \
above, but the question goes to a child RLM that has its own REPL and can work through a \
large input step by step. When recursion depth does not allow a child, they behave exactly \
like `llm_query`.
5. `SHOW_VARS()`: list the variables you have created and their types.
6. `print()`: the only way to see results. Output shown to you is truncated, so do not print \
huge values; give them to a sub-LM and print what it says.

Variables persist between code blocks and between turns, so use them as buffers to build up \
your answer.

To run code, put it in a fenced block tagged `repl`. Blocks run in order, and you see each \
block's output in the next turn. Example, a quick look at the data:
```repl
print(type(context), len(context))
print(repr(context)[:2000])
```

Example strategy, chunk + batch + aggregate (the context is a long string):
```repl
question = "Which cities does the author visit, and in what order?"
size = 200_000
chunks = [context[i:i + size] for i in range(0, len(context), size)]
prompts = [
    f"Answer from this part of a document only. Question: {question}\\nPart:\\n{chunk}"
    for chunk in chunks
]
partials = llm_query_batched(prompts)
for i, partial in enumerate(partials):
    print(i, partial[:300])
"""
_INTRO_BETWEEN_RESULTS = """ = llm_query(
    f"Combine these partial answers into one answer to: {question}\\n\\n"
    + "\\n\\n".join(partials)
)
print("""
_INTRO_AFTER_RESULT = """)
```

Example strategy, walk through sections and keep a running buffer (the context is a list of \
sections, e.g. chapters):
```repl
question = "Does the main character keep her promise?"
notes = ""
for i, section in enumerate(context):
    notes = llm_query(
        f"You are reading section {i + 1} of {len(context)}. Question: {question}\\n"
        f"Notes so far: {notes}\\nUpdate the notes with anything relevant in:\\n{section}"
    )
print(notes)
```
If the context is one string with markers (for example Markdown headers), split it with `re` \
first and treat the pieces the same way.

"""
_FINAL_ANSWERING = """Answering:
- When you are done, answer outside any code block, on a line of its own, with either
  FINAL(your answer here)
  or
  FINAL_VAR(variable_name)
  to return the value of a variable you created in the REPL.
- FINAL_VAR only reads a variable that already exists: assign it in a repl block first, and \
check with SHOW_VARS() if unsure.
- Do not answer in the same response that runs code whose output you have not seen yet; such \
a FINAL is ignored. Run the code, read its output, and answer in a later turn.
- You may also call FINAL_VAR("variable_name") inside a repl block: the run ends there with \
that variable's value.
- Only use FINAL or FINAL_VAR when you have finished the task.

"""
_ANSWER_DICT_ANSWERING = """\
Answering:
- The REPL has an `answer` dict, initially {"content": "", "ready": False}. When (and only \
when) you are done, submit your final answer from inside a repl block:
```repl
answer["content"] = "your final answer here"
answer["ready"] = True
```
- `answer["content"]` holds the answer text (a string, or anything `str()` can render); you \
can build it up over several steps. The run ends as soon as `answer["ready"]` is set to \
True, and the content at that moment is returned. Blocks after it in the same response do \
not run.
- Text outside code is never taken as the answer: FINAL(...) in prose does nothing here.
- Do not set `answer["ready"] = True` before you have seen the output that confirms the \
answer.

"""
_OUTRO = """\
Plan, then act right away: write the code in your response rather than describing what you \
would do. Lean on the sub-LMs for reading and understanding text, and make sure your final \
answer addresses the original query directly.
"""


def _system_prompt(answering: str, result_name: str) -> str:
    return (
        _INTRO_BEFORE_RESULT
        + result_name
        + _INTRO_BETWEEN_RESULTS
        + result_name
        + _INTRO_AFTER_RESULT
        + answering
        + _OUTRO
    )


DEFAULT_SYSTEM_PROMPT = _system_prompt(_FINAL_ANSWERING, "answer")
# The system prompt of the `answer` dict convention (answer_dict.py).
ANSWER_DICT_SYSTEM_PROMPT = _system_prompt(_ANSWER_DICT_ANSWERING, "combined")


def system_prompt_for(answer_convention: str) -> str:
    """The default system prompt that teaches `answer_convention` ("final", "answer_dict")."""
    if answer_convention == "answer_dict":
        return ANSWER_DICT_SYSTEM_PROMPT
    return DEFAULT_SYSTEM_PROMPT


FINAL_ANSWER_REQUEST = (
    "Please give a final answer to the user's question based on the information gathered so far."
)

# Only this many chunk lengths are listed; a huge list would swamp the root LM's window.
MAX_LISTED_LENGTHS = 100


def _json_length(value: object) -> int:
    try:
        return len(json.dumps(value, default=str))
    except (TypeError, ValueError, RecursionError):
        # Non-string keys, circular references and the like.
        return len(repr(value))


def _generic_length(value: object) -> int:
    return len(value) if isinstance(value, Sized) else len(str(value))


def context_metadata(context: object) -> tuple[str, list[int]]:
    """Return the context's type name and the character length of each of its chunks."""
    if isinstance(context, str):
        return "str", [len(context)]
    if isinstance(context, dict):
        lengths = [len(v) if isinstance(v, str) else _json_length(v) for v in context.values()]
        return "dict", lengths
    if isinstance(context, list):
        if not context:
            return "list", [0]
        first = context[0]
        # The first item decides the shape, as in the original: a list of messages is
        # measured by their contents, a list of other dicts by their JSON.
        if isinstance(first, dict) and "content" in first:
            return "list", [
                len(str(c.get("content", ""))) if isinstance(c, dict) else _generic_length(c)
                for c in context
            ]
        if isinstance(first, dict):
            return "list", [_json_length(c) for c in context]
        return "list", [_generic_length(c) for c in context]
    raise TypeError(
        f"context must be a str, dict or list, not {type(context).__name__}",
    )


def build_initial_messages(system_prompt: str, context: object) -> list[dict[str, str]]:
    """System prompt plus an assistant message describing the context's shape."""
    context_type, lengths = context_metadata(context)
    total = sum(lengths)
    listed = str(lengths)
    if len(lengths) > MAX_LISTED_LENGTHS:
        others = len(lengths) - MAX_LISTED_LENGTHS
        listed = f"{lengths[:MAX_LISTED_LENGTHS]}... [{others} others]"
    metadata = (
        f"Your context is a {context_type} with {total} total characters, "
        f"and is broken up into chunks of char lengths: {listed}."
    )
    return [
        {"role": "system", "content": system_prompt},
        {"role": "assistant", "content": metadata},
    ]


def build_user_prompt(
    root_prompt: str | None,
    iteration: int,
    context_count: int = 1,
    history_count: int = 0,
) -> dict[str, str]:
    """The user message that asks the root LM for its next action."""
    if iteration == 0:
        # Without this the model tends to guess an answer before it has looked at anything.
        opening = (
            "You have not interacted with the REPL environment or seen your context yet. "
            "Your next action should be to look through the context and work out how to "
            "answer the prompt, so don't give a final answer yet.\n\n"
        )
    else:
        opening = "The history before is your previous interactions with the REPL environment. "
    target = f'the original prompt: "{root_prompt}"' if root_prompt else "the prompt"
    prompt = (
        f"{opening}Think step by step about how to use the REPL environment (which contains "
        f"the context) to answer {target}.\n\n"
        "Continue using the REPL environment, which has the `context` variable, and querying "
        "sub-LLMs by writing code in ```repl``` blocks, and determine your answer. "
        "Your next action:"
    )
    if context_count > 1:
        prompt += (
            f"\n\nNote: You have {context_count} contexts available "
            f"(context_0 through context_{context_count - 1})."
        )
    if history_count == 1:
        prompt += (
            "\n\nNote: You have 1 prior conversation history available in the `history` variable."
        )
    elif history_count > 1:
        prompt += (
            f"\n\nNote: You have {history_count} prior conversation histories available "
            f"(history_0 through history_{history_count - 1})."
        )
    return {"role": "user", "content": prompt}
