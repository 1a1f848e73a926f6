"""`judge`: a local causal LM's verdict on a completion, as a reward for what no program can check.

    rewards:
      - {name: judge, options: {path: runs/judge/final}}            # P("Yes") of a local judge model
      - {name: math, weight: 0}                                     # logged only: a gold check beside it

How a completion is judged. The user prompt is ``template`` with ``{question}`` (the row's prompt, its chat
messages flattened to text), ``{answer}`` (the completion) and optionally ``{reference}`` (the row's
``reference_column``) filled in ONE pass, so braces inside a question or an answer are never expanded. The
answer (and the reference) are fenced with a backtick run one longer than any inside them, so an answer
cannot close its fence and talk to the judge as the prompt. The prompt goes through the judge tokenizer's
chat template (``system`` + user, generation prompt) when it has one, else it is plain text.

Scoring, engines (native, vLLM) and the content-addressed cache of judge calls are the engine's
(judge_engine.py): by default P(Yes) from one forward pass, no text parsing.

Every score says what it is in ``Score.reason`` (one of ``STATUSES``): ``scored``; ``policy_invalid`` (an
empty or blank completion: 0.0, no judge call); ``judge_failed`` (text: no verdict; probs: the labels'
total probability under ``min_label_mass``). A judge failure is never a number that could pass for a
verdict: ``on_failure="zero"`` gives 0.0 (tagged, counted), ``"exclude"`` gives NaN tagged
``judge_failed``, which the composite reward leaves out of the total and lists in
``RewardScores.excluded`` so the RL round can drop the sample from its group's advantages. A batch
whose failure rate exceeds ``max_failure_rate`` raises `JudgeFailureError`: a broken judge stops the run.

``identity()`` is what the run record stores: the engine's (model fingerprint, labels, mode, engine,
sampling) and the template's sha256, gates, reference column and failure policy.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.tokenize import is_conversational

from .audit_report import check_audit
from .base import GATED, JUDGE_FAILED, POLICY_INVALID, SCORED, Example, Score, VerifierError, as_text
from .gates import Gates, check_gates
from .judge_engine import (
    JUDGE_OPTIONS,
    JudgeCounters,
    Verdict,
    check_choice,
    check_fraction,
    make_judge,
    sha256_text,
)

log = logging.getLogger("posttrain")

DEFAULT_TEMPLATE = "Question:\n{question}\n\nAnswer:\n{answer}\n\nIs the answer correct? Reply Yes or No."
ON_FAILURE = ("exclude", "zero")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class JudgeFailureError(VerifierError):
    """More of a batch's judge calls failed than ``max_failure_rate`` allows: the judge is broken."""


# --- prompts --------------------------------------------------------------------------------------------


def check_template(template: Any, field: str, allowed: Sequence[str], required: Sequence[str]) -> frozenset[str]:
    """The placeholders of ``template``; a ValueError naming ``field`` when one it needs is missing or one
    is unknown (a typo such as ``{answr}`` would otherwise reach the judge verbatim)."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{field} must be a non-empty string, got {template!r}")
    found = frozenset(_PLACEHOLDER.findall(template))
    unknown = sorted(found - set(allowed))
    if unknown:
        raise ValueError(
            f"{field} has unknown placeholder(s) {['{' + u + '}' for u in unknown]}; "
            f"it may use {['{' + a + '}' for a in allowed]}"
        )
    for name in required:
        if name not in found:
            raise ValueError(f"{field} has no {{{name}}} placeholder: the judge would never see the {name}")
    return found


def fill(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each known ``{name}`` replaced in one pass: a value's own braces stay as they are."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def fence(text: str) -> str:
    """``text`` in a backtick fence one longer than its longest backtick run (at least 3): no run inside
    it can close the fence."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    bar = "`" * max(3, longest + 1)
    return f"{bar}\n{text}\n{bar}"


def question_text(prompt: Any) -> str:
    """The question as the judge reads it: a string prompt as it is; chat messages without the policy's
    chat template (one user turn: its content; several turns: "role: content" blocks), system turns left
    out (they instruct the policy, not the judge)."""
    if isinstance(prompt, str):
        return prompt
    if is_conversational(prompt):
        turns = [m for m in prompt if m.get("role") != "system"]
        if len(turns) == 1:
            return str(turns[0].get("content") or "")
        return "\n\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in turns)
    raise VerifierError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def prompt_values(completion: str, example: Example, row: int, reference_column: str | None) -> dict[str, str]:
    """The values of ``{question}``, ``{answer}``, ``{reference}`` for one row. The answer and the reference
    are judged without the whitespace around them (invisible to a reader, it should not move a verdict: a
    policy writing " payment" and a reference "payment" are the same answer)."""
    values = {"answer": fence(completion.strip())}
    if "prompt" in example:
        values["question"] = question_text(example["prompt"])
    if reference_column is not None:
        if example.get(reference_column) is None:
            raise VerifierError(f"row {row} has no value in the judge's reference_column {reference_column!r}")
        values["reference"] = fence(str(example[reference_column]).strip())
    return values


@dataclass(frozen=True)
class AuditGate:
    """What RL checks before training against a judge (``check``): its audit report, the worst attack's
    false-positive rate it tolerates, and warn | refuse above it."""

    audit: str | None
    max_false_positive: float
    policy: str

    @classmethod
    def checked(cls, field: str, audit: Any, max_false_positive: Any, policy: Any) -> AuditGate:
        if audit is not None and not Path(audit).is_file():
            raise ValueError(f"{field} option audit: no audit report at {audit} (write one with audit-verifier --json)")
        return cls(
            audit,
            check_fraction(max_false_positive, f"{field} option max_false_positive"),
            check_choice(policy, ("warn", "refuse"), f"{field} option audit_policy"),
        )

    def check(self, field: str) -> None:
        check_audit(self.audit, self.max_false_positive, self.policy, field)


class JudgeBacked(JudgeCounters):
    """What the rewards a `Judge` runs share (`judge`, `rubric`): the cache counters, the audit check RL makes
    before training against them, and closing the engine and the gates."""

    name: str
    audit: AuditGate
    gates: Gates

    def audit_check(self) -> None:
        """Warn (or refuse) before training against this reward when its audit says attacks get through."""
        self.audit.check(self.name)

    def close(self) -> None:
        self.gates.close()
        self.judge.close()


def failed_score(on_failure: str) -> Score:
    """What a judge failure scores: never a number that could pass for a verdict (module docstring)."""
    return Score(0.0 if on_failure == "zero" else math.nan, JUDGE_FAILED)


def check_failure_rate(field: str, verdicts: Sequence[Verdict], max_rate: float, labels: Sequence[str]) -> None:
    failed = [v for v in verdicts if v.status == JUDGE_FAILED]
    if verdicts and len(failed) / len(verdicts) > max_rate:
        raise JudgeFailureError(
            f"{field}: {len(failed)} of {len(verdicts)} judge calls in this batch gave no verdict "
            f"({len(failed) / len(verdicts):.0%} > max_failure_rate={max_rate}); e.g. {failed[0].detail}. A broken "
            f"judge stops the run rather than be trained on: check the template and labels {list(labels)} "
            f"(does the judge answer with one of them?), or raise max_failure_rate"
        )


# --- the reward ----------------------------------------------------------------------------------------


class JudgeReward(JudgeBacked):
    """The `judge` reward source (module docstring). ``score_batch(completions, examples)`` judges a
    batch in as few model calls as the cache and ``batch_size`` allow; ``identity()`` is for the run record."""

    name = "judge"

    forwarded_options = JUDGE_OPTIONS  # passed to the Judge engine as they are (registry: checked like its own)

    def __init__(
        self,
        *,
        path: str,
        template: str = DEFAULT_TEMPLATE,
        reference_column: str | None = None,
        on_failure: str = "zero",
        max_failure_rate: float = 0.5,
        audit: str | None = None,
        max_false_positive: float = 0.1,
        audit_policy: str = "warn",
        gates: Sequence[Mapping[str, Any]] = (),
        **engine: Any,
    ) -> None:
        self.gates = Gates(check_gates(gates, "judge"))  # programs a completion must pass before it is judged
        self.audit = AuditGate.checked("judge", audit, max_false_positive, audit_policy)
        found = check_template(template, "judge option template", ("question", "answer", "reference"), ("answer",))
        check_reference(found, reference_column, "judge")
        self.template, self.reference_column = template, reference_column
        self.on_failure = check_choice(on_failure, ON_FAILURE, "judge option on_failure")
        self.max_failure_rate = check_fraction(max_failure_rate, "judge option max_failure_rate")
        self.judge = make_judge(path, "judge", engine)

    def identity(self) -> dict[str, Any]:
        return {
            "reward": self.name,
            **self.judge.identity(),
            "template_sha256": sha256_text(self.template),
            "gates": self.gates.describe(),
            "reference_column": self.reference_column,
            "on_failure": self.on_failure,
            "max_failure_rate": self.max_failure_rate,
        }

    def prompt(self, completion: str, example: Example, row: int = 0) -> str:
        """The rendered judge prompt for one completion (what is judged, and what the cache keys on)."""
        if "question" in _PLACEHOLDER.findall(self.template) and "prompt" not in example:
            raise VerifierError(f"judge: row {row} has no prompt, but the template asks for {{question}}")
        return self.judge.render(fill(self.template, prompt_values(completion, example, row, self.reference_column)))

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Score]:
        texts = [as_text(c) for c in completions]
        scores: list[Score] = [Score(0.0, POLICY_INVALID)] * len(texts)  # an empty answer: nothing to judge
        rows = [i for i, t in enumerate(texts) if t.strip()]
        if self.gates:  # a hard constraint a program checks: failing it scores 0, no judge call
            passed = self.gates.passes([texts[i] for i in rows], [examples[i] for i in rows])
            for i in (i for i, ok in zip(rows, passed) if not ok):
                scores[i] = Score(0.0, GATED)
            rows = [i for i, ok in zip(rows, passed) if ok]
        verdicts = self.judge.verdicts([self.prompt(texts[i], examples[i], i) for i in rows])
        for i, v in zip(rows, verdicts):
            scores[i] = Score(v.value, SCORED) if v.status == SCORED else failed_score(self.on_failure)
        check_failure_rate("judge", verdicts, self.max_failure_rate, self.judge.labels)
        return scores

    def __call__(self, completion: str, **example: Any) -> Score:
        return self.score_batch([completion], [example])[0]


def check_reference(found: frozenset[str], reference_column: Any, field: str) -> None:
    """``{reference}`` in the template and ``reference_column`` come together."""
    if reference_column is not None and (not isinstance(reference_column, str) or not reference_column):
        raise ValueError(f"{field} option reference_column must be a column name, got {reference_column!r}")
    if "reference" in found and reference_column is None:
        raise ValueError(f"{field} option template uses {{reference}} but no reference_column names its column")
    if reference_column is not None and "reference" not in found:
        raise ValueError(
            f"{field} option reference_column={reference_column!r} is set but the template has no {{reference}}"
        )
