"""Multi-step arithmetic with a short worked solution: the built-in demo task.

    prompt:      "7+8-5+9="
    completion:  "7+8=15,15-5=10,10+9=19 \\boxed{19}"
    answer:      "19"

Each stage has its own work: pretraining learns the operations from plain worked equations
("7+8-5=7+8=15,15-5=10"); SFT learns the prompt / answer format and to end with the boxed answer; preference and RL stages
make the chained steps right more often. The held-out split is a disjoint set of expressions,
chosen by a hash of the expression, so no split is ever trained on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


def _is_heldout(expr: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(expr.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


@dataclass(frozen=True)
class ArithmeticTask:
    min_terms: int = 2
    max_terms: int = 4
    max_operand: int = 9
    heldout_fraction: float = 0.1
    verifier: str = "math"
    # With long_fraction in (0, 1): chains longer than short_terms are drawn only that often.
    short_terms: int = 3
    long_fraction: float = -1.0
    # With long_rows >= 0: exactly that many rows of `rows(n)` are chains longer than short_terms, spread
    # evenly through the rows; every other row is short. (A count, not a rate: with a handful of long
    # rows, chance would make the count, and with it what SFT learns, differ from seed to seed.)
    long_rows: int = -1

    def _terms(self, rng: random.Random, long: bool | None = None) -> int:
        if long is not None and self.min_terms <= self.short_terms < self.max_terms:
            return rng.randint(self.short_terms + 1, self.max_terms) if long else rng.randint(self.min_terms,
                                                                                               self.short_terms)
        if 0 <= self.long_fraction <= 1 and self.min_terms <= self.short_terms < self.max_terms:
            if rng.random() < self.long_fraction:
                return rng.randint(self.short_terms + 1, self.max_terms)
            return rng.randint(self.min_terms, self.short_terms)
        return rng.randint(self.min_terms, self.max_terms)

    def _expression(self, rng: random.Random, long: bool | None = None) -> tuple[str, list[str], int]:
        k = self._terms(rng, long)
        value = rng.randint(0, self.max_operand)
        expr = str(value)
        steps = []
        for _ in range(k - 1):
            b = rng.randint(0, self.max_operand)
            # Subtract only when the result stays non-negative: answers are natural numbers.
            op = "-" if (b <= value and rng.random() < 0.5) else "+"
            new = value + b if op == "+" else value - b
            steps.append(f"{value}{op}{b}={new}")
            expr += f"{op}{b}"
            value = new
        return expr, steps, value

    def rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        """``n`` prompt/completion/answer rows from one split ("train" or "test")."""
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r}: expected 'train' or 'test'")
        rng = random.Random(f"arith-{split}-{seed}")
        out, seen = [], set()
        long_slots = {(2 * j + 1) * n // (2 * self.long_rows) for j in range(self.long_rows)} if self.long_rows > 0 else set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct {split} expressions; widen the task")
            expr, steps, value = self._expression(rng, (len(out) in long_slots) if self.long_rows >= 0 else None)
            if expr in seen or _is_heldout(expr, self.heldout_fraction) != (split == "test"):
                continue
            seen.add(expr)
            out.append({
                "prompt": f"{expr}=",
                "completion": ",".join(steps) + f" \\boxed{{{value}}}",
                "answer": str(value),
            })
        return out

    def pretrain_text(self, n: int, seed: int = 0) -> list[dict]:
        """Plain worked equations, "7+8-5=7+8=15,15-5=10": no answer format, never a held-out expression."""
        rng = random.Random(f"arith-pretrain-{seed}")
        out = []
        while len(out) < n:
            expr, steps, value = self._expression(rng)
            if _is_heldout(expr, self.heldout_fraction):
                continue
            out.append({"text": f"{expr}=" + ",".join(steps)})
        return out
