"""Pairwise judging: which of two answers to a question is better, from a local judge model's label
probabilities, judged in BOTH orders (RLAIF, Lee et al. 2023). It ranks sampled completions into preference
pairs (`make-pairs --judge DIR`, the pipeline's ``make_pairs.pairwise_judge``) and is audited by
`posttrain audit-verifier --verifier pairwise_judge`.

    make-pairs --model sft --data prompts.jsonl --judge runs/judge/final -n 4 --out pairs.jsonl

The prompt is ``template`` with ``{question}``, ``{answer_a}``, ``{answer_b}`` and optionally ``{reference}``,
filled in one pass with each answer fenced (as in rewards.judge; the same `Judge` engine, options, modes and
cache). A call's score is P(first label | the two labels), the probability that the answer in position A is
the better one (text mode: 1 or 0 for the label read). Comparing answers x and y takes two calls:

    p_xy = P(A | x as A, y as B)          P(x better), x first
    p_yx = 1 - P(A | y as A, x as B)      P(x better), x second
    preference = (p_xy + p_yx) / 2        P(x better), averaged over the two orders

and the comparison's ``status`` is

* ``judge_failed`` when either order has no verdict (text: no label read; probs: the labels' mass under
  ``min_label_mass``). Never a preference: TRL's judges returned -1 for a failed pair, and after an order
  swap computed 1 - (-1) = 2, which OnlineDPO's ``rank == 0`` read as "the second answer wins".
* ``inconsistent`` when the two orders prefer different answers (p_xy and p_yx on opposite sides of 0.5):
  the judge answered the position, not the answers. A judge that always says "A" makes every comparison
  inconsistent.
* ``tie`` when the orders do not disagree (one of them may be exactly 0.5) but |preference - 0.5| <
  ``margin``, or preference is exactly 0.5: too close to call.
* ``preferred`` otherwise, with ``winner`` 0 (x) or 1 (y).

Only ``preferred`` comparisons become preferences. The position-consistency rate is the share of the
comparisons judged in both orders (failures left out) whose orders agree: (preferred + tie) / judged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import JUDGE_FAILED, SCORED, Example, VerifierError
from .judge import (
    check_reference,
    check_template,
    fence,
    fill,
    prompt_values,
)
from .judge_engine import (
    JUDGE_OPTIONS,
    JudgeCounters,
    Verdict,
    check_causal_dir,
    check_fraction,
    make_judge,
    sha256_text,
)

DEFAULT_TEMPLATE = (
    "Question:\n{question}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\nWhich answer is better? Reply A or B."
)
PREFERRED, INCONSISTENT, TIE = "preferred", "inconsistent", "tie"
PAIR_STATUSES = (PREFERRED, INCONSISTENT, TIE, JUDGE_FAILED)
FIELD = "pairwise_judge"


@dataclass(frozen=True)
class PairVerdict:
    """One comparison of x with y, both orders (module docstring): ``first`` = p_xy, ``second`` = p_yx (each
    P(x better); NaN where that order failed), ``preference`` their mean, ``status`` one of PAIR_STATUSES,
    ``winner`` 0 (x) / 1 (y) / None (no preference), ``detail`` why not, when there is no preference."""

    first: float
    second: float
    preference: float
    status: str
    winner: int | None = None
    detail: str = ""

    @property
    def consistent(self) -> bool:
        """Both orders were judged and prefer the same answer."""
        return self.status in (PREFERRED, TIE)

    @property
    def confidence(self) -> float:
        """|preference - 0.5|: how far the averaged verdict is from a coin flip (0 without a preference)."""
        return abs(self.preference - 0.5) if self.winner is not None else 0.0


def combine(xy: Verdict, yx: Verdict, margin: float) -> PairVerdict:
    """The comparison of x with y from the verdict with x first (``xy``: P(A) = P(x better)) and the verdict
    with y first (``yx``: P(A) = P(y better)). A failed order is no preference, whatever the other says."""
    p_xy = xy.value if xy.status == SCORED else math.nan
    p_yx = 1.0 - yx.value if yx.status == SCORED else math.nan
    if xy.status != SCORED or yx.status != SCORED:
        which = "x first" if xy.status != SCORED else "y first"
        why = xy.detail if xy.status != SCORED else yx.detail
        return PairVerdict(p_xy, p_yx, math.nan, JUDGE_FAILED, None, f"no verdict with {which}: {why}")
    preference = (p_xy + p_yx) / 2
    if (p_xy - 0.5) * (p_yx - 0.5) < 0:
        detail = f"the orders disagree: P(x better) {p_xy:.3g} with x first, {p_yx:.3g} with x second"
        return PairVerdict(p_xy, p_yx, preference, INCONSISTENT, None, detail)
    if abs(preference - 0.5) < margin or preference == 0.5:
        return PairVerdict(p_xy, p_yx, preference, TIE, None, f"|{preference:.3g} - 0.5| < margin {margin}")
    return PairVerdict(p_xy, p_yx, preference, PREFERRED, 0 if preference > 0.5 else 1)


def consistency_rate(verdicts: Sequence[PairVerdict]) -> float | None:
    """The share of the comparisons judged in both orders whose orders do not disagree (preferred or tie);
    None when none was judged."""
    judged = [v for v in verdicts if v.status != JUDGE_FAILED]
    return sum(v.consistent for v in judged) / len(judged) if judged else None


def check_margin(margin: Any) -> float:
    value = check_fraction(margin, f"{FIELD} option margin")
    if value >= 0.5:
        raise ValueError(
            f"{FIELD} option margin must be in [0, 0.5) (a preference is at most 0.5 from 0.5), got {margin}"
        )
    return value


def check_labels(labels: Any) -> tuple[str, str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != 2:
        raise ValueError(f"{FIELD} option labels must be two labels, the first naming the first answer, got {labels!r}")
    return labels[0], labels[1]


def check_options(options: Mapping[str, Any], *, path_exists: bool = True) -> None:
    """The checks `PairwiseJudge` makes before it loads anything (option names, template, labels, margin,
    the directory a causal LM), for a preflight; ``path_exists=False``: the judge is written by an earlier
    stage, so its directory is not looked at yet."""
    known = [*inspect.signature(PairwiseJudge).parameters, *PairwiseJudge.forwarded_options]
    known.remove("engine")  # the catch-all: its names are the forwarded options
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{FIELD}: unknown option(s) {unknown}; its options are {known}")
    found = check_template(
        options.get("template", DEFAULT_TEMPLATE),
        f"{FIELD} option template",
        ("question", "answer_a", "answer_b", "reference"),
        ("answer_a", "answer_b"),
    )
    check_reference(found, options.get("reference_column"), FIELD)
    check_labels(options.get("labels", ("A", "B")))
    check_margin(options.get("margin", 0.1))
    if path_exists:
        check_causal_dir(options.get("path"), f"{FIELD} option path")


class PairwiseJudge(JudgeCounters):
    """A local judge model comparing two answers in both orders (module docstring). ``compare(examples,
    xs, ys)`` judges every comparison of a batch in one batched, cached pass; ``identity()`` is for records."""

    name = FIELD

    # the Judge engine's options, passed as they are (label_scores excepted: a call's value is P(first label))
    forwarded_options = tuple(n for n in JUDGE_OPTIONS if n not in ("labels", "label_scores"))

    def __init__(
        self,
        *,
        path: str,
        template: str = DEFAULT_TEMPLATE,
        labels: Sequence[str] = ("A", "B"),
        margin: float = 0.1,
        reference_column: str | None = None,
        **engine: Any,
    ) -> None:
        found = check_template(
            template,
            f"{FIELD} option template",
            ("question", "answer_a", "answer_b", "reference"),
            ("answer_a", "answer_b"),
        )
        check_reference(found, reference_column, FIELD)
        self.template, self.reference_column = template, reference_column
        self.asks_question = "question" in found
        self.margin = check_margin(margin)
        # a call's value is P(first label) = P(the answer in position A is better)
        fixed = {"labels": check_labels(labels), "label_scores": (1.0, 0.0)}
        self.judge = make_judge(path, FIELD, engine, self.forwarded_options, **fixed)

    def identity(self) -> dict[str, Any]:
        return {
            "judge": self.name,
            **self.judge.identity(),
            "template_sha256": sha256_text(self.template),
            "reference_column": self.reference_column,
            "margin": self.margin,
            "orders": "both, averaged",
        }

    def prompt(self, example: Example, first: str, second: str, row: int = 0) -> str:
        """The rendered judge prompt with ``first`` as answer A and ``second`` as answer B."""
        if self.asks_question and "prompt" not in example:
            raise VerifierError(f"{FIELD}: row {row} has no prompt, but the template asks for {{question}}")
        values = prompt_values(first, example, row, self.reference_column)
        values.update(answer_a=values.pop("answer"), answer_b=fence(second))
        return self.judge.render(fill(self.template, values))

    def verdicts(self, prompts: Sequence[str]) -> list[Verdict]:
        """The judge's verdicts for rendered prompts: each one's value is P(the answer in position A is better)."""
        return self.judge.verdicts(prompts)

    def compare(self, examples: Sequence[Example], xs: Sequence[str], ys: Sequence[str]) -> list[PairVerdict]:
        """Compare ``xs[i]`` with ``ys[i]`` on ``examples[i]``: both orders of every comparison in one pass."""
        if not len(examples) == len(xs) == len(ys):
            raise ValueError(f"{len(examples)} examples, {len(xs)} first and {len(ys)} second answers")
        n = len(xs)
        prompts = [self.prompt(ex, x, y, i) for i, (ex, x, y) in enumerate(zip(examples, xs, ys))]
        prompts += [self.prompt(ex, y, x, i) for i, (ex, x, y) in enumerate(zip(examples, xs, ys))]
        found = self.verdicts(prompts)
        return [combine(a, b, self.margin) for a, b in zip(found[:n], found[n:])]

    def close(self) -> None:
        self.judge.close()


__all__ = [
    "DEFAULT_TEMPLATE",
    "INCONSISTENT",
    "PAIR_STATUSES",
    "PREFERRED",
    "TIE",
    "PairVerdict",
    "PairwiseJudge",
    "check_options",
    "combine",
    "consistency_rate",
]
