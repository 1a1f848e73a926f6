"""Built-in games: environments that take several turns and no tools.

``GuessNumberEnv``: the row holds a secret integer (``secret``) and its range (``low``..``high``, inclusive;
defaults 1..100). Each policy turn states a guess; the environment answers "higher" (the secret is larger) or
"lower" as a user message, and ends the episode with reward 1.0 on the right number. How a guess is read from a
turn's content: the last ``guess: N`` (case-insensitive; also ``guess = N`` / ``guess N``) when there is one,
else the last integer in the text; a ``<think>...</think>`` block is ignored first, so numbers mulled over in
the reasoning are not taken as the guess. A turn with no readable integer is answered with a user message
saying so and counts one ``parse_errors`` in that step's info.
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.envs.base import ParsedTurn, StepResult

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_EXPLICIT = re.compile(r"\bguess\s*(?::|=|is)?\s*([-+]?\d+)\b", re.IGNORECASE)
# An integer standing alone: not part of a word or of a decimal number ("4.5", "x2").
_INTEGER = re.compile(r"(?<![\w.])[-+]?\d+(?![\w]|\.\d)")


def read_guess(content: str) -> int | None:
    """The guess stated in ``content`` (see the module docstring), or None."""
    text = _THINK.sub(" ", content)
    explicit = _EXPLICIT.findall(text)
    if explicit:
        return int(explicit[-1])
    numbers = _INTEGER.findall(text)
    return int(numbers[-1]) if numbers else None


class GuessNumberEnv:
    """Guess-the-number (see the module docstring). One instance per trajectory; ``reset`` starts a game."""

    def __init__(self, *, low: int = 1, high: int = 100) -> None:
        if low > high:
            raise ValueError(f"low must be <= high, got {low} > {high}")
        self.tools: list[dict[str, Any]] = []
        self.default_low, self.default_high = low, high
        self.secret = self.low = self.high = 0
        self.guesses = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if "secret" not in row:
            raise ValueError(f"a guess_number row needs a 'secret' column (its columns: {sorted(row)})")
        self.low = int(row.get("low", self.default_low))
        self.high = int(row.get("high", self.default_high))
        self.secret = int(row["secret"])
        if not self.low <= self.secret <= self.high:
            raise ValueError(f"secret {self.secret} is outside its range {self.low}..{self.high}")
        self.guesses = 0
        rules = (
            f"I am thinking of an integer between {self.low} and {self.high} (inclusive). Guess it. After each "
            'guess I will answer "higher" if my number is larger than your guess, or "lower" if it is smaller. '
            'State one guess per reply, as "guess: N".'
        )
        return [{"role": "user", "content": rules}]

    def step(self, turn: ParsedTurn) -> StepResult:
        guess = read_guess(turn.content)
        if guess is None:
            reply = 'I could not find a guess in your reply. State one integer, as "guess: N".'
            return StepResult([{"role": "user", "content": reply}], None, False, {"parse_errors": 1})
        self.guesses += 1
        info = {"parse_errors": 0, "guesses": 1}
        if guess == self.secret:
            return StepResult([], 1.0, True, info)
        reply = "higher" if self.secret > guess else "lower"
        return StepResult([{"role": "user", "content": reply}], None, False, info)

    def close(self) -> None:
        pass


__all__ = ["GuessNumberEnv", "read_guess"]
