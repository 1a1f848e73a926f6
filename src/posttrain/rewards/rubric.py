"""`rubric`: typed criteria, each judged by a local judge model, combined as a weighted normalized mean.

    rewards:
      - name: rubric
        options:
          path: runs/judge/final
          criteria:
            - {name: accurate, text: "The answer states the correct total.", weight: 3}
            - {name: concise, text: "The answer is at most two sentences.", weight: 1}
          gates: [{name: json, options: {schema: {type: object}}}]    # must pass before the rubric counts

Each criterion is one judge call (rewards.judge: the same model options, labels, modes, statuses, cache and
failure policy) on ``template`` with ``{criterion}`` (the criterion's text) beside ``{question}``,
``{answer}`` and optionally ``{reference}``; all criteria x completions of a batch go to the judge in one
batched pass. A completion's score is

    sum_i w_i s_i / sum_i w_i      over the criteria i the judge scored (s_i in the label scores' range)

A criterion the judge gave no verdict for is left out of BOTH sums and counted (``last_failures``), so a
failure never pulls the score below, or changes the sign of, what the other criteria give (RLCF summed its
-1 into the reward); when no weighted criterion was scored the completion is ``judge_failed`` (0.0 or NaN,
``on_failure``). Per-criterion scores of the last batch are ``last_criteria[name]`` (NaN where a criterion
was not scored: failed, gated or an empty answer), for the metrics ``reward/<key>/<criterion>``.

Gates are programmatic verifiers (any registry name, with options): a completion must score 1 on every
gate (a NaN "does not apply" is not a pass) before the rubric counts; one that fails a gate scores 0.0
with reason "gated" and costs no judge call. An empty answer is ``policy_invalid`` (0.0) before any gate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import GATED, POLICY_INVALID, SCORED, Example, Score, as_text
from .gates import Gates, check_gates
from .judge import (
    ON_FAILURE,
    AuditGate,
    JudgeBacked,
    check_failure_rate,
    check_reference,
    check_template,
    failed_score,
    fill,
    prompt_values,
)
from .judge_engine import (
    JUDGE_OPTIONS,
    Verdict,
    check_choice,
    check_fraction,
    make_judge,
    sha256_text,
)

DEFAULT_TEMPLATE = (
    "Question:\n{question}\n\nAnswer:\n{answer}\n\nCriterion: {criterion}\n\n"
    "Does the answer meet the criterion? Reply Yes or No."
)


@dataclass(frozen=True)
class Criterion:
    """One rubric item: ``name`` (the metric key), ``text`` (what the judge checks), ``weight`` (>= 0, finite;
    a weight-0 criterion is judged and logged but does not count)."""

    name: str
    text: str
    weight: float = 1.0


def check_criteria(criteria: Any) -> tuple[Criterion, ...]:
    """The criteria as records; a ValueError naming the field (``criteria[i].weight``) when one is malformed,
    the rubric is empty, two share a name, or no criterion has a positive weight."""
    if isinstance(criteria, (str, Mapping)) or not isinstance(criteria, Sequence) or not criteria:
        raise ValueError(f"rubric option criteria must be a non-empty list of {{name, text, weight}}, got {criteria!r}")
    out = []
    for i, c in enumerate(criteria):
        if isinstance(c, Mapping):
            unknown = sorted(set(c) - {"name", "text", "weight"})
            if unknown:
                raise ValueError(f"rubric option criteria[{i}]: unknown field(s) {unknown}; fields: name, text, weight")
            c = Criterion(c.get("name"), c.get("text"), c.get("weight", 1.0))
        if not isinstance(c, Criterion):
            raise ValueError(f"rubric option criteria[{i}] must be a mapping {{name, text, weight}}, got {c!r}")
        for key in ("name", "text"):
            value = getattr(c, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"rubric option criteria[{i}].{key} must be a non-empty string, got {value!r}")
        w = c.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"rubric option criteria[{i}].weight must be a finite number >= 0, got {w!r}")
        out.append(Criterion(c.name, c.text, float(w)))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"rubric option criteria: names must be unique, got {names}")
    if not any(c.weight > 0 for c in out):
        raise ValueError("rubric option criteria: at least one criterion needs a weight > 0")
    return tuple(out)


def combine(scored: Sequence[tuple[float, float]]) -> float | None:
    """The weighted normalized mean of (weight, score) pairs; None when no weight is positive."""
    total = math.fsum(w for w, _ in scored)
    return math.fsum(w * s for w, s in scored) / total if total > 0 else None


class RubricReward(JudgeBacked):
    """The `rubric` reward source (module docstring). Judge options as for `judge`; ``criteria`` and
    ``gates`` are its own."""

    name = "rubric"

    forwarded_options = JUDGE_OPTIONS  # passed to the Judge engine as they are (registry: checked like its own)

    def __init__(
        self,
        *,
        path: str,
        criteria: Sequence[Mapping[str, Any] | Criterion],
        template: str = DEFAULT_TEMPLATE,
        reference_column: str | None = None,
        gates: Sequence[Mapping[str, Any]] = (),
        on_failure: str = "zero",
        max_failure_rate: float = 0.5,
        audit: str | None = None,
        max_false_positive: float = 0.1,
        audit_policy: str = "warn",
        **engine: Any,
    ) -> None:
        self.audit = AuditGate.checked("rubric", audit, max_false_positive, audit_policy)
        self.criteria = check_criteria(criteria)
        found = check_template(
            template,
            "rubric option template",
            ("question", "answer", "reference", "criterion"),
            ("answer", "criterion"),
        )
        check_reference(found, reference_column, "rubric")
        self.template, self.reference_column = template, reference_column
        self.on_failure = check_choice(on_failure, ON_FAILURE, "rubric option on_failure")
        self.max_failure_rate = check_fraction(max_failure_rate, "rubric option max_failure_rate")
        self.gate_specs = check_gates(gates, "rubric")
        self.judge = make_judge(path, "rubric", engine)
        self.gates = Gates(self.gate_specs)
        self.last_criteria: dict[str, list[float]] = {c.name: [] for c in self.criteria}
        self.last_failures: dict[str, int] = {c.name: 0 for c in self.criteria}

    def identity(self) -> dict[str, Any]:
        return {
            "reward": self.name,
            **self.judge.identity(),
            "template_sha256": sha256_text(self.template),
            "criteria": [{"name": c.name, "text": c.text, "weight": c.weight} for c in self.criteria],
            "gates": [{"name": n, "options": o} for n, o in self.gate_specs],
            "reference_column": self.reference_column,
            "on_failure": self.on_failure,
            "max_failure_rate": self.max_failure_rate,
        }

    def prompt(self, completion: str, example: Example, criterion: Criterion, row: int = 0) -> str:
        values = {**prompt_values(completion, example, row, self.reference_column), "criterion": criterion.text}
        return self.judge.render(fill(self.template, values))

    def criterion_verdicts(self, prompts: Sequence[str]) -> list[Verdict]:
        """The judge's verdicts for criterion prompts (a seam: tests substitute known verdicts here)."""
        return self.judge.verdicts(prompts)

    def passes_gates(self, texts: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        return self.gates.passes(texts, examples)

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Score]:
        texts = [as_text(c) for c in completions]
        n, C = len(texts), len(self.criteria)
        scores: list[Score] = [Score(0.0, POLICY_INVALID)] * n
        rows = [i for i, t in enumerate(texts) if t.strip()]
        if self.gates:
            passed = self.passes_gates([texts[i] for i in rows], [examples[i] for i in rows])
            for i in (i for i, ok in zip(rows, passed) if not ok):
                scores[i] = Score(0.0, GATED)
            rows = [i for i, ok in zip(rows, passed) if ok]
        # One pass over every (completion, criterion): row-major, criterion c of row k at k * C + c.
        prompts = [self.prompt(texts[i], examples[i], c, i) for i in rows for c in self.criteria]
        verdicts = self.criterion_verdicts(prompts)
        self.last_criteria = {c.name: [math.nan] * n for c in self.criteria}
        self.last_failures = {c.name: 0 for c in self.criteria}
        for k, i in enumerate(rows):
            scored = []
            for c, v in zip(self.criteria, verdicts[k * C : (k + 1) * C]):
                if v.status == SCORED:
                    self.last_criteria[c.name][i] = v.value
                    scored.append((c.weight, v.value))
                else:
                    self.last_failures[c.name] += 1
            value = combine(scored)
            scores[i] = failed_score(self.on_failure) if value is None else Score(value, SCORED)
        check_failure_rate("rubric", verdicts, self.max_failure_rate, self.judge.labels)
        return scores

    def __call__(self, completion: str, **example: Any) -> Score:
        return self.score_batch([completion], [example])[0]


__all__ = ["Criterion", "RubricReward", "check_criteria", "combine"]
