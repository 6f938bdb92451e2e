"""Tests for rlm_orchestrator.prompts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rlm_orchestrator.parsing import find_code_blocks
from rlm_orchestrator.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    FINAL_ANSWER_REQUEST,
    build_initial_messages,
    build_user_prompt,
    context_metadata,
)

# --- system prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "needle",
    [
        "`context`",
        "context_0",
        "history",
        "llm_query(prompt, model=None) -> str",
        "llm_query_batched(prompts, model=None) -> list[str]",
        "rlm_query(prompt)",
        "rlm_query_batched(prompts)",
        "SHOW_VARS()",
        "print()",
        '"Error:"',
        "500K",
        "FINAL(your answer here)",
        "FINAL_VAR(variable_name)",
        "```repl",
    ],
)
def test_system_prompt_mentions(needle: str) -> None:
    assert needle in DEFAULT_SYSTEM_PROMPT


def test_system_prompt_has_single_braces_and_is_not_a_template() -> None:
    # It is sent as-is, so doubled braces would reach the model literally.
    assert "{{" not in DEFAULT_SYSTEM_PROMPT
    assert "}}" not in DEFAULT_SYSTEM_PROMPT
    assert "{chunk}" in DEFAULT_SYSTEM_PROMPT


def test_system_prompt_examples_are_valid_python() -> None:
    blocks = find_code_blocks(DEFAULT_SYSTEM_PROMPT)
    assert len(blocks) >= 3
    for block in blocks:
        compile(block, "<example>", "exec")
    assert any("llm_query_batched(" in block for block in blocks)


def test_final_answer_request() -> None:
    assert "final answer" in FINAL_ANSWER_REQUEST


# --- context_metadata ---------------------------------------------------------------------------


def test_metadata_str() -> None:
    assert context_metadata("hello") == ("str", [5])
    assert context_metadata("") == ("str", [0])


def test_metadata_dict() -> None:
    ctx: dict[str, Any] = {"a": "abc", "b": [1, 2], "c": {"k": None}, "d": 7}
    assert context_metadata(ctx) == (
        "dict",
        [3, len(json.dumps([1, 2])), len(json.dumps({"k": None})), 1],
    )


def test_metadata_dict_uses_str_default_for_unserialisable_values() -> None:
    value = {1, 2}
    ctx = {"s": value}
    assert context_metadata(ctx) == ("dict", [len(json.dumps(value, default=str))])


def test_metadata_dict_falls_back_to_repr() -> None:
    circular: list[Any] = []
    circular.append(circular)
    bad_keys = {(1, 2): "x"}
    assert context_metadata({"c": circular, "k": bad_keys}) == (
        "dict",
        [len(repr(circular)), len(repr(bad_keys))],
    )


def test_metadata_empty_dict() -> None:
    assert context_metadata({}) == ("dict", [])


def test_metadata_list_of_str() -> None:
    assert context_metadata(["ab", "cde", ""]) == ("list", [2, 3, 0])


def test_metadata_empty_list() -> None:
    assert context_metadata([]) == ("list", [0])


def test_metadata_list_of_messages() -> None:
    ctx = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": 12345}, {}]
    assert context_metadata(ctx) == ("list", [5, 5, 0])


def test_metadata_list_of_other_dicts() -> None:
    ctx = [{"a": 1}, {"b": [1, 2, 3]}]
    assert context_metadata(ctx) == ("list", [len(json.dumps(d)) for d in ctx])


def test_metadata_list_of_values_without_len() -> None:
    assert context_metadata([12345, 1.5, None, [1, 2]]) == ("list", [5, 3, 4, 2])


@pytest.mark.parametrize("context", [("a", "b"), 42, None, b"bytes"])
def test_metadata_rejects_other_types(context: object) -> None:
    with pytest.raises(TypeError, match="str, dict or list"):
        context_metadata(context)


# --- build_initial_messages ---------------------------------------------------------------------


def test_initial_messages_for_str() -> None:
    messages = build_initial_messages("SYS", "x" * 42)
    assert messages == [
        {"role": "system", "content": "SYS"},
        {
            "role": "assistant",
            "content": "Your context is a str with 42 total characters, "
            "and is broken up into chunks of char lengths: [42].",
        },
    ]


def test_initial_messages_for_list() -> None:
    content = build_initial_messages("S", ["ab", "cde"])[1]["content"]
    assert content == (
        "Your context is a list with 5 total characters, "
        "and is broken up into chunks of char lengths: [2, 3]."
    )


def test_initial_messages_exactly_100_chunks_are_all_listed() -> None:
    content = build_initial_messages("S", ["a"] * 100)[1]["content"]
    assert content.endswith(f"{[1] * 100}.")
    assert "others" not in content


def test_initial_messages_more_than_100_chunks_are_cut() -> None:
    context = ["x" * i for i in range(1, 151)]
    content = build_initial_messages("S", context)[1]["content"]
    total = sum(range(1, 151))
    assert content == (
        f"Your context is a list with {total} total characters, and is broken up into "
        f"chunks of char lengths: {list(range(1, 101))}... [50 others]."
    )


def test_initial_messages_reject_bad_context() -> None:
    with pytest.raises(TypeError):
        build_initial_messages("S", 3)


# --- build_user_prompt --------------------------------------------------------------------------


def test_first_iteration_prompt_without_root_prompt() -> None:
    message = build_user_prompt(None, 0)
    assert message["role"] == "user"
    content = message["content"]
    assert content.startswith("You have not interacted with the REPL environment")
    assert "don't give a final answer yet" in content
    assert "`context` variable" in content
    assert "original prompt" not in content
    assert content.endswith("Your next action:")
    assert "Note:" not in content


def test_first_iteration_prompt_with_root_prompt() -> None:
    content = build_user_prompt("What is the capital?", 0)["content"]
    assert content.startswith("You have not interacted")
    assert 'answer the original prompt: "What is the capital?"' in content


def test_later_iteration_prompt() -> None:
    content = build_user_prompt("Q?", 3)["content"]
    assert content.startswith(
        "The history before is your previous interactions with the REPL environment."
    )
    assert "You have not interacted" not in content
    assert 'answer the original prompt: "Q?"' in content
    assert content.endswith("Your next action:")


def test_empty_root_prompt_is_not_quoted() -> None:
    assert "original prompt" not in build_user_prompt("", 1)["content"]


def test_multiple_contexts_note() -> None:
    content = build_user_prompt(None, 1, context_count=3)["content"]
    assert "You have 3 contexts available (context_0 through context_2)." in content
    assert "contexts available" not in build_user_prompt(None, 1, context_count=1)["content"]


def test_single_history_note() -> None:
    content = build_user_prompt(None, 0, history_count=1)["content"]
    assert "1 prior conversation history" in content
    assert "`history` variable" in content
    assert "history_0" not in content


def test_multiple_histories_note() -> None:
    content = build_user_prompt("Q", 2, context_count=2, history_count=4)["content"]
    assert "(history_0 through history_3)" in content
    assert "4 prior conversation histories" in content
    assert "(context_0 through context_1)" in content
    # The context note comes before the history note.
    assert content.index("context_0 through") < content.index("history_0 through")


def test_no_history_note_by_default() -> None:
    assert "prior conversation" not in build_user_prompt(None, 2)["content"]
