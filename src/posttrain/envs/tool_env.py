"""``ToolEnv``: the generic environment over a ``Toolbox``. The policy calls tools until it answers without one.

    env = ToolEnv(Toolbox([calculator]), "hermes")
    messages = env.reset({"prompt": "What is 12.5% of 880?"})
    out = env.step(parser.parse(turn_text))   # tool calls -> tool messages; no call -> done (the final answer)

Each step answers, in this order: every tool call of the turn, run one after another (a trajectory's calls stay
sequential; trajectories run in parallel in the driver), each result as the parser's result message; then one
tool-error message per call that did not parse. Results come first so that they line up, by position, with the
calls the assistant message holds (templates pairing calls with results read them that way). A turn with
neither calls nor parse errors ends the episode: its content is the final answer, which the run's reward
functions score; the environment itself gives no reward unless ``reward_fn`` is set.

``info`` of each step holds that step's counts: ``tool_calls``, ``tool_errors`` (calls that failed, including
refused ones past ``max_calls_per_turn``), ``parse_errors``, ``timeouts`` (the driver sums them per trajectory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.envs.base import ParsedTurn, StepResult, ToolCall
from posttrain.envs.parsers import ToolParser, get_parser
from posttrain.envs.tools import Toolbox


def prompt_messages(row: dict[str, Any], column: str = "prompt", system_prompt: str | None = None) -> list[dict]:
    """The row's prompt as chat messages: a string becomes one user message, a list of messages is kept as is
    (copied). ``system_prompt`` is put first unless the prompt already starts with a system message."""
    if column not in row:
        raise ValueError(f"the row has no {column!r} column (its columns: {sorted(row)})")
    prompt = row[column]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise ValueError(f"column {column!r} must be a string or a list of chat messages, got {type(prompt).__name__}")
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class ToolEnv:
    """An ``Environment`` whose actions are calls to ``toolbox``'s tools, read by ``parser`` (a name in
    ``parsers.PARSERS`` or a parser object).

    ``state``: the object whose methods the toolbox holds, when it is one (a stateful tool class): its
    ``reset(row)`` (if it has one) is called at reset, and a non-None return replaces the row's prompt (a string
    or messages); its ``close()`` (if any) is called at close. ``reward_fn(turn, row) -> float | None``: the
    reward of the final turn, when the environment has one to give. ``max_calls_per_turn``: calls past it are not
    run and are answered with an error (a turn of 100 sandbox runs would stall the whole batch).
    """

    def __init__(
        self,
        toolbox: Toolbox,
        parser: str | ToolParser = "hermes",
        *,
        prompt_column: str = "prompt",
        system_prompt: str | None = None,
        max_calls_per_turn: int = 8,
        state: Any = None,
        reward_fn: Callable[[ParsedTurn, dict[str, Any]], float | None] | None = None,
    ) -> None:
        if max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn must be at least 1, got {max_calls_per_turn}")
        self.toolbox = toolbox
        self.parser = get_parser(parser) if isinstance(parser, str) else parser
        self.tools = toolbox.schemas
        self.prompt_column = prompt_column
        self.system_prompt = system_prompt
        self.max_calls_per_turn = max_calls_per_turn
        self.state = state
        self.reward_fn = reward_fn
        self.row: dict[str, Any] = {}

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        self.row = row
        custom = self.state.reset(row) if callable(getattr(self.state, "reset", None)) else None
        if custom is not None:
            return prompt_messages({"prompt": custom}, "prompt", self.system_prompt)
        return prompt_messages(row, self.prompt_column, self.system_prompt)

    def step(self, turn: ParsedTurn) -> StepResult:
        info = {"tool_calls": len(turn.tool_calls), "tool_errors": 0, "parse_errors": len(turn.errors), "timeouts": 0}
        if not turn.tool_calls and not turn.errors:
            reward = self.reward_fn(turn, self.row) if self.reward_fn is not None else None
            return StepResult([], reward, True, info)
        messages = []
        for i, call in enumerate(turn.tool_calls):
            if i >= self.max_calls_per_turn:
                output = f"error: too many tool calls in one turn (at most {self.max_calls_per_turn}); not run"
                messages.append(self.parser.result_message(call, output, True))
                info["tool_errors"] += 1
                continue
            result = self.toolbox.run(call)
            info["tool_errors"] += int(result.error)
            info["timeouts"] += int(result.timeout)
            messages.append(self.parser.result_message(call, result.output, result.error))
        for error in turn.errors:
            messages.append(self.parser.result_message(ToolCall("", {}), f"error: {error}", True))
        return StepResult(messages, None, False, info)

    def close(self) -> None:
        close = getattr(self.state, "close", None)
        if callable(close):
            close()


__all__ = ["ToolEnv", "prompt_messages"]
