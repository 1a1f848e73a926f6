"""The statistics of evaluation: intervals, pass@k (unbiased), maj@k and the majority baseline.

    pass@k = E_prompts[ 1 - C(n - c, k) / C(n, k) ]      (Chen et al. 2021; n samples, c correct)
    maj@k  = E_prompts[ the most common extracted answer among k samples is correct ]
    mean@k = E_prompts[ c / n ]

Intervals: Wilson score interval for greedy accuracy (a proportion over prompts); for the per-prompt
averages a normal interval on the mean over prompts (t ~ 1.96), clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections import Counter

from posttrain.rewards.extract import gold_answer

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float], z: float = Z95) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return (0.0, 1.0)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return (max(0.0, m - half), min(1.0, m + half))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k)/C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Is the most common extracted answer a correct one? (ties: the first seen; no answer never wins)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return any(ok for a, ok in zip(answers, correct) if a == winner)


def majority_baseline(rows: list[dict], gold=gold_answer) -> tuple[float, str] | None:
    """(accuracy, answer) of always giving the most common gold answer (``gold(row)``: by default the
    `answer` column, else `label`; the verifier's own reading where it has one): the floor a model must
    clear to have learned anything beyond the answer distribution. None when the rows carry no gold answer."""
    golds = [gold(r) for r in rows]
    if not rows or any(g is None for g in golds):
        return None
    answer, count = Counter(golds).most_common(1)[0]
    if count == 1 and len(rows) > 1:  # every gold differs (extraction): there is no distribution to exploit
        return None
    return count / len(rows), answer


def versus_baseline(accuracy: float, ci: tuple[float, float], baseline: float) -> str:
    """How a greedy accuracy stands against the majority baseline (an exact rate on the same rows): "above"
    when its 95% interval clears the baseline, "not significantly above" when the accuracy is higher but its
    interval reaches down to the baseline, "below" when the accuracy is lower (equal counts as not
    significantly above: nothing was learned beyond the answer distribution, nothing was lost either)."""
    if ci[0] > baseline:
        return "above"
    return "below" if accuracy < baseline else "not significantly above"


def versus_majority(ev: dict) -> str | None:
    """``versus_baseline`` of an evaluation summary (``EvalSummary.to_json()``); None without a baseline."""
    base = ev.get("majority_baseline")
    if base is None or ev.get("greedy_accuracy") is None:
        return None
    return versus_baseline(ev["greedy_accuracy"], tuple(ev.get("greedy_ci", (0.0, 1.0))), base)
