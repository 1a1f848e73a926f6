"""Spurious-reward controls: rewards that carry no (or wrong) information about correctness.

They exist to calibrate a training run (Shao et al. 2025, "Spurious Rewards: Rethinking Training Signals
in RLVR"): if a model improves as much under `random`, `incorrect` or `format_only` as under the real
verifier, the gain did not come from the reward's signal.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

from .base import Example, Score
from .extract import DEFAULT_MAX_CHARS, ExtractMode, extract_answers
from .math import MathVerifier


class RandomReward:
    """`random`: Bernoulli(p) rewards, independent of correctness, reproducible.

    The k-th completion this object scores (k counts from 0 across all calls) gets
    `1.0 if u < p else 0.0` with `u = blake2b(seed, k, completion) / 2**64`. So a rerun with the same seed
    that scores the same completions in the same order gets the same rewards, identical completions
    within a batch still get independent draws, and nothing depends on Python's per-process hash
    randomization or a global RNG. The counter is the object's only state (`draws`); `state_dict()` carries
    it through a checkpoint, so a resumed run draws what an uninterrupted one draws.
    """

    name = "random"

    def __init__(self, *, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.seed = int(seed)
        self.draws = 0
        self._lock = threading.Lock()

    def _next_index(self) -> int:
        with self._lock:
            index = self.draws
            self.draws += 1
        return index

    def __call__(self, completion: str, **example: Any) -> Score:
        index = self._next_index()
        digest = hashlib.blake2b(f"{self.seed}:{index}:{completion}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        return Score(1.0 if u < self.p else 0.0, "random")

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        with self._lock:
            self.draws = int(state["draws"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# Reasons for which the math verifier could not say "wrong": no single answer, or the check never finished.
_UNDECIDED = frozenset({"no_answer", "hedged", "timeout", "crashed", "gold_unparseable", "answer_unparseable"})


class IncorrectReward:
    """`incorrect`: 1.0 exactly when a single final answer was extracted AND the math check says it is
    wrong; 0.0 for correct answers, missing or hedged answers, and checks that timed out. Takes every
    `math` option (the same extraction, tolerance, pool)."""

    name = "incorrect"

    def __init__(self, *, workers: int = 0, **math_options: Any) -> None:
        self.math = MathVerifier(workers=workers, **math_options)

    def _invert(self, score: Score) -> Score:
        if score.reason in _UNDECIDED:
            return Score(0.0, score.reason, score.answer)
        return Score(1.0 - float(score), "incorrect" if score == 0.0 else "correct", score.answer)

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Score]:
        return [self._invert(s) for s in self.math.score_batch(completions, examples)]

    def __call__(self, completion: str, **example: Any) -> Score:
        return self.score_batch([completion], [example])[0]

    def close(self) -> None:
        self.math.close()

    def __enter__(self) -> IncorrectReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FormatOnlyReward:
    """`format_only`: 1.0 when one final answer can be extracted in the expected format (same `extract` /
    `pattern` options as `math`), whether or not it is correct; hedged answers score 0."""

    name = "format_only"

    def __init__(
        self,
        *,
        extract: ExtractMode = "auto",
        pattern: str | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        self.extract = extract
        self.pattern = pattern
        self.max_chars = int(max_chars)
        extract_answers("", mode=extract, pattern=pattern, max_chars=self.max_chars)

    def __call__(self, completion: str, **example: Any) -> Score:
        found = extract_answers(completion, mode=self.extract, pattern=self.pattern, max_chars=self.max_chars)
        if found.hedged:
            return Score(0.0, "hedged")
        if found.answer is None:
            return Score(0.0, "no_answer")
        return Score(1.0, "formatted", found.answer)
