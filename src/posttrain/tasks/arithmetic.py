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

import random
from dataclasses import dataclass

from posttrain.tasks.worked import WorkedTask


@dataclass(frozen=True)
class ArithmeticTask(WorkedTask):
    _tag = "arith"  # the random streams' name: the rows drawn for a seed stay those drawn before
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
            return (
                rng.randint(self.short_terms + 1, self.max_terms)
                if long
                else rng.randint(self.min_terms, self.short_terms)
            )
        if 0 <= self.long_fraction <= 1 and self.min_terms <= self.short_terms < self.max_terms:
            if rng.random() < self.long_fraction:
                return rng.randint(self.short_terms + 1, self.max_terms)
            return rng.randint(self.min_terms, self.short_terms)
        return rng.randint(self.min_terms, self.max_terms)

    def _instance(self, rng: random.Random, long: bool | None = None) -> tuple[str, list[str], int]:
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
