"""Counting a letter in a string, with a running tally: the demo's second built-in task.

    prompt:      "cabbac:b="
    completion:  "c0,a0,b1,b2,a2,c2 \\boxed{2}"
    answer:      "2"

A task of another kind than the arithmetic chains (no numbers in the prompt, an answer that is a count
over the whole string), with the same shape of work: pretraining sees plain tallies of every length
("cabbac:b=c0,a0,b1,b2,a2,c2"), SFT shows the answer format on short strings, and RL has to carry the
tally through strings longer than any SFT showed. The held-out split is a disjoint set of prompts,
chosen by a hash of the prompt, so no split is ever trained on.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from posttrain.tasks.worked import WorkedTask


@dataclass(frozen=True)
class CountingTask(WorkedTask):
    _tag = "count"
    min_len: int = 2
    max_len: int = 8
    letters: int = 4  # the strings use the first `letters` letters of the alphabet
    heldout_fraction: float = 0.1
    verifier: str = "math"
    # As in the arithmetic task: with long_rows >= 0, exactly that many rows of `rows(n)` are strings
    # longer than short_len, spread evenly; every other row is short.
    short_len: int = 5
    long_rows: int = -1

    def __post_init__(self):
        if not 1 <= self.letters <= 26 or not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"counting: need 1 <= letters <= 26 and 1 <= min_len <= max_len, got {self}")

    def _length(self, rng: random.Random, long: bool | None) -> int:
        if long is None or not self.min_len <= self.short_len < self.max_len:
            return rng.randint(self.min_len, self.max_len)
        return rng.randint(self.short_len + 1, self.max_len) if long else rng.randint(self.min_len, self.short_len)

    def _instance(self, rng: random.Random, long: bool | None = None) -> tuple[str, list[str], int]:
        alphabet = string.ascii_lowercase[: self.letters]
        text = "".join(rng.choice(alphabet) for _ in range(self._length(rng, long)))
        target = rng.choice(alphabet)
        steps, count = [], 0
        for ch in text:
            count += ch == target
            steps.append(f"{ch}{count}")
        return f"{text}:{target}", steps, count
