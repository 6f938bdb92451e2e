"""Tests for rlm_orchestrator.parsing."""

from __future__ import annotations

import pytest

from rlm_orchestrator.parsing import (
    FinalAnswer,
    find_code_blocks,
    find_final_answer,
    format_code_result_message,
    format_execution_output,
    truncate_output,
)

# --- find_code_blocks -------------------------------------------------------------------------


def test_single_block_is_stripped() -> None:
    text = "Let me look.\n```repl\n\n  x = 1\nprint(x)  \n\n```\nDone."
    assert find_code_blocks(text) == ["x = 1\nprint(x)"]


def test_multiple_blocks_in_order() -> None:
    text = "```repl\na = 1\n```\nthen\n```repl\nb = 2\n```\nand\n```repl\nc = 3\n```"
    assert find_code_blocks(text) == ["a = 1", "b = 2", "c = 3"]


def test_spaces_after_tag_and_indented_closing_fence() -> None:
    assert find_code_blocks("```repl  \t\nx = 1\n   ```") == ["x = 1"]


def test_crlf_line_endings() -> None:
    assert find_code_blocks("```repl\r\nx = 1\r\n```\r\n") == ["x = 1"]


def test_other_languages_are_ignored() -> None:
    text = "```python\nx = 1\n```\n```\ny = 2\n```\n```repl\nz = 3\n```\n```replx\nw = 4\n```"
    assert find_code_blocks(text) == ["z = 3"]


def test_unterminated_fence_is_ignored() -> None:
    assert find_code_blocks("```repl\nx = 1\nprint(x)\n") == []
    assert find_code_blocks("```repl\na = 1\n```\n```repl\nb = 2\n") == ["a = 1"]


def test_fence_must_be_followed_by_newline() -> None:
    assert find_code_blocks("```repl x = 1```") == []


def test_empty_blocks_are_skipped_and_do_not_swallow_the_next_block() -> None:
    text = "```repl\n```\ntext\n```repl\nx = 1\n```\n```repl\n   \n```"
    assert find_code_blocks(text) == ["x = 1"]


def test_no_blocks() -> None:
    assert find_code_blocks("just prose") == []


# --- find_final_answer: FINAL_VAR ---------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "FINAL_VAR(answer)",
        'FINAL_VAR("answer")',
        "FINAL_VAR( 'answer' )",
        "   FINAL_VAR(answer)   ",
        "\tFINAL_VAR(answer)",
    ],
)
def test_final_var_forms(line: str) -> None:
    text = f"I stored it.\n{line}\n"
    assert find_final_answer(text) == FinalAnswer(kind="final_var", value="answer")


def test_final_var_is_checked_before_final() -> None:
    text = "FINAL(the text answer)\nFINAL_VAR(result)"
    assert find_final_answer(text) == FinalAnswer(kind="final_var", value="result")


def test_first_final_var_wins() -> None:
    assert find_final_answer("FINAL_VAR(first)\nFINAL_VAR(second)") == FinalAnswer(
        "final_var", "first"
    )


@pytest.mark.parametrize(
    "line",
    [
        "FINAL_VAR(1abc)",
        "FINAL_VAR(a + b)",
        "FINAL_VAR(\"answer')",
        "FINAL_VAR()",
        "FINAL_VAR(answer) and more",
        "Then FINAL_VAR(answer)",
    ],
)
def test_invalid_final_var_is_not_an_answer(line: str) -> None:
    assert find_final_answer(line) is None


def test_invalid_final_var_falls_through_to_final() -> None:
    text = "FINAL_VAR(a + b)\nFINAL(42)"
    assert find_final_answer(text) == FinalAnswer(kind="final", value="42")


def test_final_var_inside_repl_block_is_code() -> None:
    text = "```repl\nx = compute()\nFINAL_VAR(x)\n```"
    assert find_final_answer(text) is None


# --- find_final_answer: FINAL -------------------------------------------------------------------


def test_simple_final() -> None:
    assert find_final_answer("Done.\nFINAL(  Paris  )\n") == FinalAnswer("final", "Paris")


def test_final_at_very_start_and_end() -> None:
    assert find_final_answer("FINAL(42)") == FinalAnswer("final", "42")


def test_indented_final() -> None:
    assert find_final_answer("Answer:\n    FINAL(indented)") == FinalAnswer("final", "indented")


def test_final_not_at_line_start_is_ignored() -> None:
    assert find_final_answer("My FINAL(answer) is this") is None
    assert find_final_answer("My FINAL(answer)") is None


def test_first_final_wins_and_does_not_swallow_the_rest() -> None:
    # Upstream returned "a)\nx\nFINAL(b".
    assert find_final_answer("FINAL(a)\nx\nFINAL(b)") == FinalAnswer("final", "a")


def test_nested_parentheses() -> None:
    assert find_final_answer("FINAL(f(x) = (a+b))") == FinalAnswer("final", "f(x) = (a+b)")


def test_multi_line_final() -> None:
    text = "Here it is:\nFINAL(line one\nline two (with parens)\nline three)\n"
    assert find_final_answer(text) == FinalAnswer(
        "final", "line one\nline two (with parens)\nline three"
    )


def test_trailing_text_after_closing_paren_is_not_an_answer() -> None:
    assert find_final_answer("FINAL(x) trailing words") is None


def test_trailing_text_skips_to_later_valid_final() -> None:
    assert find_final_answer("FINAL(x) trailing words\nFINAL(y)") == FinalAnswer("final", "y")


def test_trailing_whitespace_after_closing_paren_is_fine() -> None:
    assert find_final_answer("FINAL(x)   \t\nmore prose") == FinalAnswer("final", "x")


def test_unbalanced_open_paren_falls_back_to_first_paren_ending_a_line() -> None:
    assert find_final_answer("FINAL(a :( b)") == FinalAnswer("final", "a :( b")
    assert find_final_answer("FINAL(a :( b)\nmore (text)") == FinalAnswer("final", "a :( b")


def test_extra_close_paren_uses_the_paren_that_ends_the_line() -> None:
    assert find_final_answer("FINAL(the answer is 3 :) really)") == FinalAnswer(
        "final", "the answer is 3 :) really"
    )


def test_unbalanced_final_does_not_run_into_the_next_statement() -> None:
    assert find_final_answer("FINAL(a :( b\nFINAL(c)") == FinalAnswer("final", "c")


def test_unclosed_final_is_not_an_answer() -> None:
    assert find_final_answer("FINAL(never closed\nat all") is None


def test_empty_final_is_skipped() -> None:
    assert find_final_answer("FINAL(   )") is None
    assert find_final_answer("FINAL()\nFINAL(real)") == FinalAnswer("final", "real")


def test_final_inside_repl_block_is_code() -> None:
    text = "```repl\nFINAL(not an answer)\n```"
    assert find_final_answer(text) is None


def test_final_after_repl_block_is_found() -> None:
    text = "```repl\nprint('FINAL(no)')\nFINAL(nope)\n```\nFINAL(yes)"
    assert find_final_answer(text) == FinalAnswer("final", "yes")


def test_text_after_closing_fence_is_not_a_line_start() -> None:
    assert find_final_answer("```repl\nx = 1\n```FINAL(x)") is None


def test_final_inside_unterminated_fence_still_counts() -> None:
    # An unterminated fence is not code (it is never run), so its text is plain prose.
    assert find_final_answer("```repl\nFINAL(42)") == FinalAnswer("final", "42")


def test_final_inside_other_language_fence_counts() -> None:
    assert find_final_answer("```text\nFINAL(42)\n```") == FinalAnswer("final", "42")


def test_crlf_final() -> None:
    assert find_final_answer("Done\r\nFINAL(42)\r\n") == FinalAnswer("final", "42")
    assert find_final_answer("FINAL_VAR(ans)\r\n") == FinalAnswer("final_var", "ans")


def test_no_final() -> None:
    assert find_final_answer("Still working on it.") is None
    assert find_final_answer("") is None


def test_final_answer_is_frozen() -> None:
    answer = FinalAnswer("final", "x")
    with pytest.raises(AttributeError):
        answer.value = "y"  # type: ignore[misc]


# --- output formatting --------------------------------------------------------------------------


def test_format_execution_output_all_parts() -> None:
    out = format_execution_output("hello\n", "Boom: bad", ["a", "b"])
    assert out == "\nhello\n\n\n\nBoom: bad\n\nREPL variables: ['a', 'b']\n"


def test_format_execution_output_stdout_only() -> None:
    assert format_execution_output("hi", "", []) == "\nhi"


def test_format_execution_output_variables_only() -> None:
    assert format_execution_output("", "", ("x",)) == "REPL variables: ['x']\n"


def test_format_execution_output_empty() -> None:
    assert format_execution_output("", "", []) == "No output"


def test_truncate_output_short_text_unchanged() -> None:
    assert truncate_output("abc", max_chars=3) == "abc"
    assert truncate_output("") == ""


def test_truncate_output_notes_cut_chars() -> None:
    assert truncate_output("abcdefghij", max_chars=4) == "abcd... + [6 chars...]"


def test_truncate_output_default_limit() -> None:
    text = "x" * 20_005
    assert truncate_output(text) == "x" * 20_000 + "... + [5 chars...]"


def test_format_code_result_message() -> None:
    assert format_code_result_message("print(1)", "\n1") == {
        "role": "user",
        "content": "Code executed:\n```python\nprint(1)\n```\n\nREPL output:\n\n1",
    }


# --- code fences other than ```repl (code_fences) ---------------------------------------------


def test_only_repl_fences_run_by_default() -> None:
    text = "```python\nx = 1\n```\n```repl\ny = 2\n```"
    assert find_code_blocks(text) == ["y = 2"]


def test_the_languages_given_run_and_no_other() -> None:
    text = "```python\nx = 1\n```\n```py\nz = 3\n```\n```repl\ny = 2\n```\n```python3\nw = 4\n```"
    assert find_code_blocks(text, ("repl", "python")) == ["x = 1", "y = 2"]
    assert find_code_blocks(text, ("py", "python")) == ["x = 1", "z = 3"]


def test_a_final_inside_an_accepted_fence_is_code_not_an_answer() -> None:
    text = "```python\nFINAL('from code')\n```"
    assert find_final_answer(text) == FinalAnswer("final", "'from code'")
    assert find_final_answer(text, ("repl", "python")) is None
