"""Tool-call parsers: several calls in a turn, malformed JSON, a missing name, text without calls, backticks
inside code, and the result messages each parser formats."""

from __future__ import annotations

import pytest

from posttrain.envs.base import ToolCall
from posttrain.envs.parsers import PARSERS, CodeParser, HermesParser, Llama3JsonParser, get_parser


def test_registry() -> None:
    assert sorted(PARSERS) == ["code", "hermes", "llama3_json"]
    assert isinstance(get_parser("hermes"), HermesParser)
    with pytest.raises(ValueError, match="unknown tool-call parser 'qwen'; available: code, hermes, llama3_json"):
        get_parser("qwen")


# ---------------------------------------------------------------------------- hermes

HERMES = HermesParser()


def test_hermes_several_calls_and_the_content_around_them() -> None:
    text = (
        "<think>I need two numbers.</think>\nLet me look.\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    )
    turn = HERMES.parse(text)
    assert turn.text == text
    assert turn.tool_calls == (
        ToolCall("calculator", {"expression": "2+2"}),
        ToolCall("get_weather", {"city": "Oslo", "days": 2}),
    )
    assert turn.errors == ()
    assert turn.content == "<think>I need two numbers.</think>\nLet me look."


def test_hermes_text_without_calls() -> None:
    turn = HERMES.parse("The answer is 42.")
    assert turn.tool_calls == () and turn.errors == () and turn.content == "The answer is 42."


def test_hermes_malformed_calls_become_errors_and_the_good_ones_still_run() -> None:
    text = (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}\n</tool_call>'  # missing brace
        '<tool_call>\n["calculator"]\n</tool_call>'  # not an object
        '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>'  # no name
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>'  # arguments not an object
        '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>'  # name not a string
        '<tool_call>\n{"name": "ok", "arguments": {"a": 1}}\n</tool_call>'
    )
    turn = HERMES.parse(text)
    assert turn.tool_calls == (ToolCall("ok", {"a": 1}),)
    assert len(turn.errors) == 5
    assert turn.errors[0].startswith("<tool_call> block 1 is not valid JSON")
    assert "must be a JSON object" in turn.errors[1]
    assert 'block 3 has no "name"' in turn.errors[2]
    assert "\"arguments\" of 'f' must be a JSON object" in turn.errors[3]
    assert '"name" must be a non-empty string' in turn.errors[4]
    assert turn.content == ""


def test_hermes_leniencies() -> None:
    # Arguments as a JSON string (OpenAI's wire format), no arguments at all, an id, and a last block left
    # unclosed because the turn stopped at the end of the call (vLLM reads it too).
    text = (
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "b", "id": "call_7"}</tool_call>'
        '<tool_call>\n{"name": "c", "arguments": {}}\n'
    )
    turn = HERMES.parse(text)
    assert turn.tool_calls == (ToolCall("a", {"x": 1}), ToolCall("b", {}, "call_7"), ToolCall("c", {}))
    assert turn.errors == ()


def test_hermes_result_message() -> None:
    assert HERMES.result_message(ToolCall("calculator", {}), "4", False) == {
        "role": "tool",
        "name": "calculator",
        "content": "4",
    }
    assert HERMES.result_message(ToolCall("b", {}, "call_7"), "x", True)["tool_call_id"] == "call_7"
    assert HERMES.result_message(ToolCall("", {}), "error: bad", True) == {"role": "tool", "content": "error: bad"}


# ---------------------------------------------------------------------------- llama3_json

LLAMA = Llama3JsonParser()


def test_llama3_single_and_several_calls() -> None:
    turn = LLAMA.parse('{"name": "calculator", "parameters": {"expression": "2+2"}}')
    assert turn.tool_calls == (ToolCall("calculator", {"expression": "2+2"}),) and turn.errors == ()
    turn = LLAMA.parse(
        '<|python_tag|>{"name": "a", "parameters": {"s": "x; y"}}; {"name": "b", "arguments": {"n": 1}}<|eom_id|>'
    )
    assert turn.tool_calls == (ToolCall("a", {"s": "x; y"}), ToolCall("b", {"n": 1}))  # ";" inside a string
    assert turn.errors == () and turn.content == ""


def test_llama3_plain_text_is_content() -> None:
    for text in ("The answer is 4.", '<|python_tag|>print("hi")', 'Sure: {"name": "a", "parameters": {}}'):
        turn = LLAMA.parse(text)
        assert turn.tool_calls == () and turn.errors == ()
    assert LLAMA.parse("  The answer is 4.\n").content == "The answer is 4."


def test_llama3_malformed() -> None:
    turn = LLAMA.parse('{"name": "a", "parameters": {"x": 1}')
    assert turn.tool_calls == () and "tool call 1 is not valid JSON" in turn.errors[0]
    turn = LLAMA.parse('{"parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert turn.tool_calls == (ToolCall("b", {}),) and 'tool call 1 has no "name"' in turn.errors[0]
    turn = LLAMA.parse('{"name": "a", "parameters": {}} and then some text')
    assert turn.tool_calls == (ToolCall("a", {}),)
    assert "unexpected text after tool call 1" in turn.errors[0]
    turn = LLAMA.parse('{"name": "a", "parameters": "nope"}')
    assert turn.tool_calls == () and "\"parameters\" of 'a' must be a JSON object" in turn.errors[0]


def test_llama3_result_message() -> None:
    assert LLAMA.result_message(ToolCall("a", {}), "out", False) == {"role": "tool", "name": "a", "content": "out"}


# ---------------------------------------------------------------------------- code

CODE = CodeParser()


def test_code_several_blocks() -> None:
    text = "First the sum.\n```python\nprint(1 + 2)\n```\nNow the product.\n```py\nx = 6\nprint(x * 7)\n```\nDone."
    turn = CODE.parse(text)
    assert turn.tool_calls == (
        ToolCall("python", {"code": "print(1 + 2)"}),
        ToolCall("python", {"code": "x = 6\nprint(x * 7)"}),
    )
    assert turn.errors == ()
    assert turn.content == "First the sum.\n\nNow the product.\n\nDone."


def test_code_backticks_inside_the_code_do_not_end_the_block() -> None:
    code = 'fence = "```"\nprint(f"{fence}python")\ns = """\n  ```inside\n"""\nprint(len(s))'
    turn = CODE.parse(f"Try:\n```python\n{code}\n```\n")
    assert turn.tool_calls == (ToolCall("python", {"code": code}),) and turn.errors == ()


def test_code_text_without_blocks_and_other_languages() -> None:
    turn = CODE.parse("The answer is 42; in shell:\n```bash\necho 42\n```\n")
    assert turn.tool_calls == () and turn.errors == ()
    assert "```bash" in turn.content
    assert CODE.parse("Inline `print(1)` is not a block.").tool_calls == ()


def test_code_unclosed_block_is_an_error() -> None:
    turn = CODE.parse("Run:\n```python\nprint(1)\n```\nand\n```python\nwhile True:\n    pass")
    assert turn.tool_calls == (ToolCall("python", {"code": "print(1)"}),)
    assert len(turn.errors) == 1 and turn.errors[0].startswith("unclosed ```python block")
    assert turn.content == "Run:\n\nand"


def test_code_result_message_is_an_output_block() -> None:
    call = ToolCall("python", {"code": "print(3)"})
    assert CODE.result_message(call, "3\n", False) == {"role": "tool", "name": "python", "content": "```output\n3\n```"}
    assert CODE.result_message(call, "", False)["content"] == "```output\n\n```"
