"""Tool-call parsers: a policy turn's text -> ``ParsedTurn`` (its content, the calls in it, what failed to
parse), and a tool's output -> the message that answers it. Named like vLLM's ``--tool-call-parser`` choices.

- ``hermes`` (Hermes 2 Pro / Qwen2.5 / Qwen3 templates): zero or more blocks
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`` anywhere in the turn; the content is the
  text without them. As vLLM does, a last block left unclosed (the turn ended before ``</tool_call>``) is read.
- ``llama3_json`` (Llama 3.1 / 3.2 / 3.3 JSON tool calling): the whole turn, optionally after
  ``<|python_tag|>``, is a JSON object ``{"name": "f", "parameters": {...}}`` ("arguments" also accepted), or
  several separated by ";". A turn that does not start with "{" (after the tag) is plain content.
- ``code`` (code-interpreter style, as ToRL and ReTool): each ```` ```python ```` fenced block is a call
  ``ToolCall("python", {"code": ...})``; a block ends at a line holding only ```` ``` ````, so backticks inside
  the code (``print("```")``) do not end it. Its result is an output block ```` ```output\\n...\\n``` ````.

A call that cannot be read (malformed JSON, not an object, no "name", arguments not an object, an unclosed code
block) makes no ``ToolCall``: it becomes one line in ``errors``, which the environment answers with a
tool-error observation the policy can learn from. Parsers are stateless; one instance serves every episode.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

from posttrain.envs.base import ParsedTurn, ToolCall

_SNIPPET = 160


class ToolParser(Protocol):
    name: str

    def parse(self, text: str) -> ParsedTurn: ...

    def result_message(self, call: ToolCall, output: str, error: bool) -> dict[str, Any]: ...


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def _tool_message(call: ToolCall, content: str) -> dict[str, Any]:
    """{"role": "tool", "name": ..., "content": ...}; the name (and the call's id) only when there is one: a
    parse error answers no named call."""
    message: dict[str, Any] = {"role": "tool"}
    if call.name:
        message["name"] = call.name
    if call.id:
        message["tool_call_id"] = call.id
    message["content"] = content
    return message


def call_from_json(obj: Any, where: str, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall:
    """A ``ToolCall`` from a decoded JSON value; ValueError (its message is the parse error) when it is not one.
    Arguments given as a JSON string holding an object (OpenAI's wire format) are accepted."""
    if not isinstance(obj, dict):
        raise ValueError(f'{where} must be a JSON object with "name" and "arguments", got {type(obj).__name__}')
    name = obj.get("name")
    if name is None:
        raise ValueError(f'{where} has no "name": {_snippet(json.dumps(obj))}')
    if not isinstance(name, str) or not name:
        raise ValueError(f'{where}: "name" must be a non-empty string, got {json.dumps(name)}')
    key = next((k for k in argument_keys if k in obj), None)
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # reported below as not an object
    if not isinstance(arguments, dict):
        raise ValueError(f'{where}: "{key}" of {name!r} must be a JSON object, got {_snippet(json.dumps(obj[key]))}')
    call_id = obj.get("id")
    return ToolCall(name, arguments, call_id if isinstance(call_id, str) else "")


class HermesParser:
    """``<tool_call>{json}</tool_call>`` blocks (Hermes 2 Pro, Qwen2.5, Qwen3)."""

    name = "hermes"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)

    def parse(self, text: str) -> ParsedTurn:
        calls: list[ToolCall] = []
        errors: list[str] = []
        for i, match in enumerate(self._BLOCK.finditer(text), start=1):
            body = match.group(1) if match.group(1) is not None else match.group(2)
            where = f"<tool_call> block {i}"
            try:
                obj = json.loads(body)
            except ValueError as exc:
                errors.append(f"{where} is not valid JSON ({exc}): {_snippet(body)}")
                continue
            try:
                calls.append(call_from_json(obj, where))
            except ValueError as exc:
                errors.append(str(exc))
        content = self._BLOCK.sub("", text).strip()
        return ParsedTurn(text, content, tuple(calls), tuple(errors))

    def result_message(self, call: ToolCall, output: str, error: bool) -> dict[str, Any]:
        return _tool_message(call, output)


class Llama3JsonParser:
    """Llama 3.x JSON tool calling: the turn is ``{"name": ..., "parameters": {...}}`` (or several joined by
    ";"), optionally after ``<|python_tag|>``."""

    name = "llama3_json"
    _TAG = "<|python_tag|>"
    _END_TOKENS = ("<|eom_id|>", "<|eot_id|>")

    def parse(self, text: str) -> ParsedTurn:
        body = text.strip()
        for token in self._END_TOKENS:
            body = body.removesuffix(token).rstrip()
        body = body.removeprefix(self._TAG).lstrip()
        if not body.startswith("{"):
            return ParsedTurn(text, text.strip())
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        errors: list[str] = []
        pos, i = 0, 0
        while pos < len(body):
            i += 1
            where = f"tool call {i}"
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError as exc:
                errors.append(f"{where} is not valid JSON ({exc}): {_snippet(body[pos:])}")
                break
            try:
                calls.append(call_from_json(obj, where, ("parameters", "arguments")))
            except ValueError as exc:
                errors.append(str(exc))
            pos = _skip_space(body, end)
            if pos < len(body):
                if body[pos] != ";":
                    errors.append(f"unexpected text after {where} (separate calls with ';'): {_snippet(body[pos:])}")
                    break
                pos = _skip_space(body, pos + 1)
        return ParsedTurn(text, "", tuple(calls), tuple(errors))

    def result_message(self, call: ToolCall, output: str, error: bool) -> dict[str, Any]:
        return _tool_message(call, output)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


class CodeParser:
    """Fenced ```` ```python ```` blocks as calls to the ``python`` tool (ToRL / ReTool style)."""

    name = "code"
    tool_name = "python"
    # An opening fence "```python" (or py / python3) on its own line; the block ends at the first line that holds
    # only ``` (markdown's rule), so ``` inside a line of code does not end it.
    _BLOCK = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py3?)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
    _OPEN = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py3?)[ \t]*$", re.MULTILINE)

    def parse(self, text: str) -> ParsedTurn:
        calls: list[ToolCall] = []
        errors: list[str] = []
        kept: list[str] = []
        pos = 0
        for match in self._BLOCK.finditer(text):
            kept.append(text[pos : match.start()])
            code = match.group(1).removesuffix("\n")
            calls.append(ToolCall(self.tool_name, {"code": code}))
            pos = match.end()
        rest = text[pos:]
        unclosed = self._OPEN.search(rest)
        if unclosed:
            errors.append(
                f"unclosed ```python block (end it with a line holding only ```): {_snippet(rest[unclosed.end() :])}"
            )
            rest = rest[: unclosed.start()]
        kept.append(rest)
        content = "".join(kept).strip()
        return ParsedTurn(text, content, tuple(calls), tuple(errors))

    def result_message(self, call: ToolCall, output: str, error: bool) -> dict[str, Any]:
        body = output.removesuffix("\n")
        return _tool_message(call, f"```output\n{body}\n```")


PARSERS: dict[str, ToolParser] = {p.name: p for p in (HermesParser(), Llama3JsonParser(), CodeParser())}


def get_parser(name: str) -> ToolParser:
    """The parser registered as ``name`` (see ``PARSERS``)."""
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; available: {', '.join(sorted(PARSERS))}") from None


__all__ = ["PARSERS", "CodeParser", "HermesParser", "Llama3JsonParser", "ToolParser", "call_from_json", "get_parser"]
