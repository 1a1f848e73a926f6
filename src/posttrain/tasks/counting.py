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

from posttrain.tasks.arithmetic import _is_heldout


@dataclass(frozen=True)
class CountingTask:
    min_len: int = 2
    max_len: int = 8
    letters: int = 4            # the strings use the first `letters` letters of the alphabet
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

    def rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        """``n`` prompt/completion/answer rows from one split ("train" or "test")."""
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r}: expected 'train' or 'test'")
        rng = random.Random(f"count-{split}-{seed}")
        out, seen = [], set()
        long_slots = {(2 * j + 1) * n // (2 * self.long_rows) for j in range(self.long_rows)} if self.long_rows > 0 else set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct {split} strings; widen the task")
            query, steps, count = self._instance(rng, (len(out) in long_slots) if self.long_rows >= 0 else None)
            if query in seen or _is_heldout(query, self.heldout_fraction) != (split == "test"):
                continue
            seen.add(query)
            out.append({"prompt": f"{query}=", "completion": ",".join(steps) + f" \\boxed{{{count}}}",
                        "answer": str(count)})
        return out

    def pretrain_text(self, n: int, seed: int = 0) -> list[dict]:
        """Plain tallies, "cabbac:b=c0,a0,b1,b2,a2,c2": no answer format, never a held-out prompt."""
        rng = random.Random(f"count-pretrain-{seed}")
        out = []
        while len(out) < n:
            query, steps, _ = self._instance(rng)
            if _is_heldout(query, self.heldout_fraction):
                continue
            out.append({"text": f"{query}=" + ",".join(steps)})
        return out
