"""The environment API: what a multi-turn episode exchanges with the world, as plain typed records.

An environment gets a dataset row and returns the first observation (chat messages); each policy turn is
parsed (``ParsedTurn``: its text, the tool calls in it, and what failed to parse) and handed to
``step``, which returns the next observation (or none), an optional reward, done, and info. The trainer
owns tokenization: an environment never sees or returns token ids.

    env = make_env(...)                       # one instance per trajectory (it may hold state)
    messages = env.reset(row)                 # the prompt: [{"role": "user", "content": ...}, ...]
    while True:
        turn = parser.parse(policy_text)      # envs.parsers
        out = env.step(turn)                  # StepResult(messages, reward, done, info)
        if out.done: break
    env.close()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

STOP_REASONS = ("done", "max_turns", "length", "context", "tool_error", "timeout")
# A trajectory cut by a budget is "truncated" in DAPO's sense (overlong filtering / shaping reads this).
TRUNCATED_STOPS = frozenset({"max_turns", "length", "context"})


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass(frozen=True)
class ParsedTurn:
    """One policy turn, as the parser read it. ``text`` is the decoded turn (for people and the final-answer
    verifiers), ``content`` the text without the tool-call markup, ``errors`` one line per call that could
    not be read (malformed JSON, missing name ...): each becomes a tool-error observation and counts as a
    parse failure."""

    text: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepResult:
    """What ``Environment.step`` returns. ``messages``: the observation appended to the conversation (tool
    results as {"role": "tool", "name": ..., "content": ...}, or user turns); empty when ``done``.
    ``reward``: an optional environment reward for this step (summed over the episode, weighted by the
    config). ``info``: counters the run logs (``tool_calls``, ``tool_errors``, ``parse_errors``, ``timeouts``
    are summed per trajectory)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    reward: float | None = None
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    """``tools``: JSON schemas of the tools it offers (``[]`` for none), passed to the chat template as
    ``apply_chat_template(messages, tools=...)``."""

    tools: list[dict[str, Any]]

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]: ...

    def step(self, turn: ParsedTurn) -> StepResult: ...

    def close(self) -> None: ...
