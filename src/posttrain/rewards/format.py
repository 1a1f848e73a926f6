"""`format` / `regex` (does the completion have the required shape) and `overlong` (DAPO length penalty)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .base import Score

# Exactly one reasoning block, then exactly one answer block with some non-space content, nothing else.
# `.*?` alone would accept `<think></think><answer></answer>` (format without content) and
# `<answer>a</answer><answer>b</answer>` (the lazy dot can span a closing tag under a whole-string match),
# so tags may not nest or repeat. Written with a lookahead, not `\S` between two stars, to stay linear.
DEFAULT_FORMAT_PATTERN = (
    r"<think>(?:(?!</?think>).)*</think>\s*"
    r"<answer>(?=\s*(?!</answer>)\S)(?:(?!</?answer>|</?think>).)*</answer>"
)

_FLAG_NAMES = {"DOTALL": re.DOTALL, "IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "VERBOSE": re.VERBOSE}


def _flags(flags: int | str | Sequence[str]) -> int:
    if isinstance(flags, int):
        return flags
    names = [flags] if isinstance(flags, str) else list(flags)
    value = 0
    for name in names:
        for part in str(name).replace("|", ",").split(","):
            part = part.strip().upper()
            if not part:
                continue
            if part not in _FLAG_NAMES:
                raise ValueError(f"unknown regex flag {part!r}; known: {sorted(_FLAG_NAMES)}")
            value |= _FLAG_NAMES[part]
    return value


class RegexVerifier:
    """1.0 when the regex matches the completion, else 0.0.

    Options: `pattern` (required), `flags` ("DOTALL", "IGNORECASE", ... or an int; default DOTALL),
    `full` (True: the pattern must match the whole completion, as if anchored with ^...$; False: anywhere),
    `strip` (ignore leading/trailing whitespace, e.g. a trailing newline before EOS; default True),
    `max_chars` (longer completions score 0 without running the regex: a cap on matching cost).
    """

    name = "regex"

    def __init__(
        self,
        *,
        pattern: str,
        flags: int | str | Sequence[str] = "DOTALL",
        full: bool = True,
        strip: bool = True,
        max_chars: int = 100_000,
    ) -> None:
        self.pattern = pattern
        self._regex = re.compile(pattern, _flags(flags))
        self.full = full
        self.strip = strip
        self.max_chars = int(max_chars)

    def __call__(self, completion: str, **example: Any) -> Score:
        text = completion.strip() if self.strip else completion
        if len(text) > self.max_chars:
            return Score(0.0, "too_long")
        match = self._regex.fullmatch(text) if self.full else self._regex.search(text)
        return Score(1.0, "match") if match else Score(0.0, "no_match")


class FormatVerifier(RegexVerifier):
    """`format`: the reasoning/answer template; `RegexVerifier` with `DEFAULT_FORMAT_PATTERN` by default."""

    name = "format"

    def __init__(self, *, pattern: str = DEFAULT_FORMAT_PATTERN, **options: Any) -> None:
        super().__init__(pattern=pattern, **options)


def soft_overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), scaled by `factor`:

        0                                      if length <= max_length - buffer
        ((max_length - buffer) - length)/buffer  if max_length - buffer < length <= max_length
        -1                                     if length > max_length

    A penalty term in [-factor, 0], added to the correctness reward; not a [0, 1] score.
    """
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"need 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}")
    expected = max_length - buffer
    if length <= expected:
        return 0.0
    if length <= max_length:
        return (expected - length) / buffer * factor
    return -1.0 * factor


class OverlongPenalty:
    """`overlong`: DAPO soft overlong punishment from the completion's length in tokens.

    Returns values in [-penalty_factor, 0] (a penalty term, the only verifier outside [0, 1]). The length
    comes from the row's `completion_length` column (`length_column`), which `RewardFunction` fills from
    its `completion_lengths` argument; a missing length is an error, since counting characters instead
    would silently change the penalty's scale.

    Options: `max_completion_length` (L_max, the generation cap in tokens), `buffer` (L_cache; default a
    quarter of L_max, DAPO used 4096 of 20480), `penalty_factor` (default 1.0), `length_column`.
    """

    name = "overlong"

    def __init__(
        self,
        *,
        max_completion_length: int,
        buffer: int | None = None,
        penalty_factor: float = 1.0,
        length_column: str = "completion_length",
    ) -> None:
        self.max_completion_length = int(max_completion_length)
        self.buffer = int(buffer) if buffer is not None else max(1, self.max_completion_length // 4)
        self.penalty_factor = float(penalty_factor)
        self.length_column = length_column
        soft_overlong_penalty(0, self.max_completion_length, self.buffer)  # validates the options now

    def __call__(self, completion: str, **example: Any) -> Score:
        if example.get(self.length_column) is None:
            raise KeyError(
                f"overlong needs the completion length in tokens in column {self.length_column!r} "
                "(pass completion_lengths to the reward function)"
            )
        length = int(example[self.length_column])
        value = soft_overlong_penalty(length, self.max_completion_length, self.buffer, self.penalty_factor)
        return Score(value, "overlong" if value < 0 else "within_budget")
