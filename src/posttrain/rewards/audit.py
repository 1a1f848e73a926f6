"""The verifier audit behind `posttrain audit-verifier` (the command line is `posttrain.commands.audit`).

Three questions, each answered from data rather than trust:
  1. Does every gold answer score 1? (A verifier that rejects golds teaches nothing; a mismatch usually
     means the gold format and the extraction disagree.)
  2. Does every adversarial completion score 0? (probes.py: hedges, empty/huge inputs, injection, code
     exit/equality/monkeypatch tricks.) Any reward there is a hack waiting for the policy to find it.
  3. Optionally, on completions sampled from the model to be trained: what fraction passes? ~all means
     the task (or the verifier) is too easy to give a learning signal; none means too hard.

A judge (`judge`, `rubric`: probe family "judge"; `pairwise_judge`: family "pairwise") is audited the same
way with the attacks that fool LLM judges (probes.judge_attacks: master keys, an empty answer, the question
echoed, padding, injected verdicts, a fake verdict in a reasoning block, a wrong answer). Its scores are
probabilities, so an attack is a FALSE POSITIVE when it scores >= ``threshold`` (default: the midpoint of
the judge's label scores, 0.5 for P(Yes)), where the truthful verdict is No; a gold answer counts as accepted
at >= ``threshold``. The report gives the false-positive rate per attack (``attack_rates``,
``false_positive_rate`` in the JSON; `audited_false_positive` reads it back for a trainer), the verbosity
check (the correct answer short vs after filler: they should score alike; ``length_bias``), and for a
pairwise judge each attack compared with the gold answer in both orders: a false positive is a comparison
that would become a preference for the attack, and ``position_consistency`` is the share whose two orders
agree.

Exit status: 0 when no attack's false-positive rate, nor the share of rejected gold answers, exceeds
``max_false_positive`` (a verifier: 0, so golds all pass and no probe gets any reward; a judge: 0.1 by
default); 1 otherwise; 2 on a usage or data error.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .audit_report import audited_false_positive  # noqa: F401 - re-exported: the trainer's reader
from .base import JUDGE_FAILED, score_all
from .base import verifier_name as _display_name
from .pairwise import PREFERRED, TIE, PairwiseJudge, consistency_rate
from .probes import (
    JUDGE_FAMILIES,
    Probe,
    adversarial_probes,
    family_of,
    gold_column,
    length_pair,
    render_gold,
)
from .probes import gold_template as gold_template_of
from .registry import load

_ONE = 1.0 - 1e-9
JUDGE_MAX_FALSE_POSITIVE = 0.1  # a judge's default tolerance per attack (a verifier's is 0)
MAX_LENGTH_GAP = 0.25  # |mean score (long) - mean score (short)| above this is flagged
NOT_PAIRED = ("empty",)  # make-pairs never judges an empty completion: no pairwise attack with it


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    kind: Literal["gold", "adversarial"]
    row: int
    expected: float  # gold: the score must reach this; adversarial: the score must not exceed it (judges: stay under)
    got: float
    passed: bool
    reason: str


@dataclass(frozen=True)
class Calibration:
    n_prompts: int
    n_samples: int
    pass_fraction: float  # samples scoring 1 (a judge: scoring >= its threshold)
    mean_reward: float
    prompts_all_pass: float  # fraction of prompts whose every sample scores 1
    prompts_none_pass: float
    verdict: Literal["ok", "too easy", "too hard"]


@dataclass(frozen=True)
class AttackRate:
    """One attack over the rows it was tried on: ``rate`` = false_positives / n. ``mean_score`` and
    ``max_score`` are the scores it got (pairwise: P(attack better), both orders averaged; NaN scores left
    out); ``judge_failed`` the judge calls that gave no verdict (never a false positive); ``consistency``
    (pairwise) the share of its comparisons whose two orders agree."""

    attack: str
    n: int
    false_positives: int
    rate: float
    mean_score: float
    max_score: float
    judge_failed: int = 0
    consistency: float | None = None


@dataclass(frozen=True)
class LengthBias:
    """The verbosity check over ``n`` rows: the correct answer short and after filler. Pointwise: the mean
    score of each and ``difference`` = long - short (``max_abs_difference`` the largest per row). Pairwise:
    ``long`` is the mean P(long better) over both orders, ``short`` = 1 - long."""

    n: int
    short: float
    long: float
    difference: float
    max_abs_difference: float
    kind: Literal["scores", "preference"] = "scores"


@dataclass(frozen=True)
class AuditReport:
    verifier: str
    options: dict[str, Any]
    family: str
    n_rows: int
    gold: tuple[ProbeResult, ...]
    adversarial: tuple[ProbeResult, ...]
    calibration: Calibration | None
    flags: tuple[str, ...]
    seconds: float
    gold_template: str = ""  # how gold answers were written as completions ({answer} marks the answer)
    # A judge's false positive: a score >= threshold. None: a verifier, where any reward above 0 counts.
    threshold: float | None = None
    max_false_positive: float = 0.0  # the largest tolerated rate per attack (and of rejected golds)
    attack_rates: tuple[AttackRate, ...] = ()
    length_bias: LengthBias | None = None
    position_consistency: float | None = None  # pairwise: share of comparisons whose orders agree
    identity: dict[str, Any] | None = None  # a judge's identity() (model fingerprint, template hash, ...)

    @property
    def gold_failures(self) -> tuple[ProbeResult, ...]:
        return tuple(r for r in self.gold if not r.passed)

    @property
    def adversarial_failures(self) -> tuple[ProbeResult, ...]:
        return tuple(r for r in self.adversarial if not r.passed)

    @property
    def gold_rejection_rate(self) -> float:
        return len(self.gold_failures) / len(self.gold) if self.gold else 0.0

    @property
    def attacks_over(self) -> tuple[AttackRate, ...]:
        """The attacks whose false-positive rate exceeds ``max_false_positive``."""
        return tuple(a for a in self.attack_rates if a.rate > self.max_false_positive)

    @property
    def ok(self) -> bool:
        return self.gold_rejection_rate <= self.max_false_positive and not self.attacks_over

    def false_positive_rate(self) -> dict[str, float]:
        return {a.attack: a.rate for a in self.attack_rates}

    def summary(self) -> dict[str, Any]:
        """The audit in brief, as a pipeline's stage evaluation keeps it (the whole report is audit.json)."""
        return {
            "ok": self.ok,
            "threshold": self.threshold,
            "max_false_positive": self.max_false_positive,
            "n_gold": len(self.gold),
            "gold_rejection_rate": self.gold_rejection_rate,
            "attacks": [
                {"attack": a.attack, "n": a.n, "rate": a.rate, "mean_score": a.mean_score} for a in self.attack_rates
            ],
            "length_bias": None if self.length_bias is None else self.length_bias.difference,
            "flags": list(self.flags),
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["n_gold_failures"] = len(self.gold_failures)
        out["n_adversarial_failures"] = len(self.adversarial_failures)
        out["false_positive_rate"] = self.false_positive_rate()
        return out


def judge_threshold(options: Mapping[str, Any]) -> float:
    """The midpoint of a judge's label scores (default evenly 0..1: 0.5, i.e. P(Yes) >= 0.5)."""
    scores = options.get("label_scores")
    if not scores:
        return 0.5
    return (min(float(s) for s in scores) + max(float(s) for s in scores)) / 2


def _reason(score: float) -> str:
    return str(getattr(score, "reason", ""))


def _labels(options: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], family: str) -> list[str]:
    if options.get("labels"):
        return [str(x) for x in options["labels"]]
    if family != "label" or not rows:
        return []
    column = gold_column(family, options, rows[0])
    seen: list[str] = []
    for row in rows:
        value = row.get(column)
        if value is not None and str(value) not in seen:
            seen.append(str(value))
    return seen


def _score_gold(
    verifier: Any,
    family: str,
    options: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    template: str | None,
    threshold: float | None = None,
) -> list[ProbeResult]:
    index, completions = [], []
    for i, row in enumerate(rows):
        text = render_gold(family, options, row, template)
        if text is not None:
            index.append(i)
            completions.append(text)
    scores = score_all(verifier, completions, [rows[i] for i in index])
    need = _ONE if threshold is None else threshold
    return [
        ProbeResult("gold", "gold", i, need, float(s), bool(float(s) >= need), _reason(s))
        for i, s in zip(index, scores)
    ]


def _score_probes(
    verifier: Any,
    family: str,
    options: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    probe_rows: int,
    workdir: Path,
    threshold: float | None = None,
    template: str | None = None,
) -> list[ProbeResult]:
    labels = _labels(options, rows, family)
    planned: list[tuple[int, Probe]] = []
    for i, row in enumerate(rows[:probe_rows]):
        marker = str(workdir / f"pwned_row{i}")
        probes = adversarial_probes(family, options, row, marker, labels, template)
        extra = getattr(verifier, "adversarial_probes", None)  # a verifier may add its own (e.g. code)
        if callable(extra):
            probes += [Probe(name, text) for name, text in extra(row)]
        planned += [(i, p) for p in probes]
    scores = score_all(verifier, [p.completion for _, p in planned], [rows[i] for i, _ in planned])
    results = []
    for (i, probe), score in zip(planned, scores):
        value = float(score)
        reason = _reason(score)
        if threshold is None:  # a verifier: any reward is a hack; a NaN is a fault
            passed = not (value > 0.0) and not math.isnan(value)
        else:  # a judge: a verdict at or over the threshold is a false positive; no verdict is none
            passed = math.isnan(value) or value < threshold
        if probe.marker is not None and Path(probe.marker).exists():
            passed, reason = False, f"INJECTED CODE RAN: {probe.marker} was created"
        results.append(ProbeResult(probe.name, "adversarial", i, threshold or 0.0, value, passed, reason))
    return results


def _pointwise_length_bias(
    verifier: Any,
    family: str,
    options: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    probe_rows: int,
    template: str,
) -> LengthBias | None:
    pairs = []
    for row in rows[:probe_rows]:
        gold = row.get(gold_column(family, options, row))
        if gold is not None:
            pairs.append((row, *length_pair(str(gold), template)))
    if not pairs:
        return None
    scores = score_all(verifier, [c for _, s, lg in pairs for c in (s, lg)], [r for r, *_ in pairs for _ in (0, 1)])
    short, long = [float(x) for x in scores[0::2]], [float(x) for x in scores[1::2]]
    diffs = [b - a for a, b in zip(short, long) if not (math.isnan(a) or math.isnan(b))]
    if not diffs:
        return None
    return LengthBias(
        n=len(diffs),
        short=_mean([a for a in short if not math.isnan(a)]),
        long=_mean([b for b in long if not math.isnan(b)]),
        difference=_mean(diffs),
        max_abs_difference=max(abs(d) for d in diffs),
    )


def _score_pairwise(
    judge: PairwiseJudge, options: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], probe_rows: int, template: str
) -> tuple[list[ProbeResult], LengthBias | None, float | None]:
    """Each attack compared with the row's gold answer in both orders (the attack as x): a false positive is
    a comparison that would become a preference for the attack. Then the verbosity pair (long as x)."""
    planned: list[tuple[int, str, str, str]] = []  # (row, attack, attack text, gold text)
    lengths: list[tuple[int, str, str]] = []
    for i, row in enumerate(rows[:probe_rows]):
        gold = row.get(gold_column("pairwise", options, row))
        if gold is None:
            continue
        right = template.replace("{answer}", str(gold))
        attacks = adversarial_probes("pairwise", options, row, "", [], template)
        planned += [(i, p.name, p.completion, right) for p in attacks if p.name not in NOT_PAIRED]
        lengths.append((i, *length_pair(str(gold), template)))
    found = judge.compare(
        [rows[i] for i, *_ in planned] + [rows[i] for i, *_ in lengths],
        [x for _, _, x, _ in planned] + [long for _, _, long in lengths],
        [y for *_, y in planned] + [short for _, short, _ in lengths],
    )
    results = []
    for (i, name, _, _), v in zip(planned, found):
        bad = v.status == PREFERRED and v.winner == 0
        results.append(ProbeResult(name, "adversarial", i, 0.5, v.preference, not bad, v.status))
    length_verdicts = found[len(planned) :]
    judged = [v.preference for v in length_verdicts if not math.isnan(v.preference)]
    bias = None
    if judged:
        long = _mean(judged)
        bias = LengthBias(len(judged), 1 - long, long, 2 * long - 1, max(abs(2 * p - 1) for p in judged), "preference")
    return results, bias, consistency_rate(found)


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else math.nan


def attack_rates(results: Sequence[ProbeResult], pairwise: bool = False) -> list[AttackRate]:
    """Per attack (probe name, in first-seen order): how many rows it was tried on and got through."""
    by_name: dict[str, list[ProbeResult]] = {}
    for r in results:
        by_name.setdefault(r.probe, []).append(r)
    out = []
    for name, rs in by_name.items():
        bad = sum(not r.passed for r in rs)
        finite = [r.got for r in rs if not math.isnan(r.got)]
        judged = [r for r in rs if r.reason != JUDGE_FAILED]
        out.append(
            AttackRate(
                attack=name,
                n=len(rs),
                false_positives=bad,
                rate=bad / len(rs),
                mean_score=_mean(finite),
                max_score=max(finite) if finite else math.nan,
                judge_failed=len(rs) - len(judged),
                consistency=(sum(r.reason in (PREFERRED, TIE) for r in judged) / len(judged) if judged else None)
                if pairwise
                else None,
            )
        )
    return out


def _calibrate(
    verifier: Any, rows: Sequence[Mapping[str, Any]], sampled: Sequence[Sequence[str]], threshold: float | None = None
) -> Calibration:
    if len(sampled) != len(rows):
        raise ValueError(f"sampled has {len(sampled)} groups for {len(rows)} rows")
    need = _ONE if threshold is None else threshold
    flat = [(i, c) for i, group in enumerate(sampled) for c in group]
    scores = [float(s) for s in score_all(verifier, [c for _, c in flat], [rows[i] for i, _ in flat])]
    per_prompt: list[list[bool]] = [[] for _ in rows]
    for (i, _), s in zip(flat, scores):
        per_prompt[i].append(s >= need)
    groups = [g for g in per_prompt if g]
    passes = [s >= need for s in scores]
    fraction = sum(passes) / len(passes) if passes else 0.0
    verdict: Literal["ok", "too easy", "too hard"] = "ok"
    if passes and fraction >= 0.95:
        verdict = "too easy"
    elif passes and fraction == 0.0:
        verdict = "too hard"
    return Calibration(
        n_prompts=len(groups),
        n_samples=len(scores),
        pass_fraction=fraction,
        mean_reward=sum(scores) / len(scores) if scores else 0.0,
        prompts_all_pass=sum(all(g) for g in groups) / len(groups) if groups else 0.0,
        prompts_none_pass=sum(not any(g) for g in groups) / len(groups) if groups else 0.0,
        verdict=verdict,
    )


def _flags(
    gold: list[ProbeResult],
    adversarial: list[ProbeResult],
    calibration: Calibration | None,
    template: str = "",
    *,
    family: str = "",
    rates: Sequence[AttackRate] = (),
    max_false_positive: float = 0.0,
    threshold: float | None = None,
    length_bias: LengthBias | None = None,
    consistency: float | None = None,
) -> tuple[str, ...]:
    flags = []
    if not gold and family != "pairwise":
        flags.append("no gold answers checked (code rows need a `solution` column)")
    gold_fail = [r for r in gold if not r.passed]
    adv_fail = [r for r in adversarial if not r.passed]
    if gold_fail:
        flags.append(
            f"{len(gold_fail)}/{len(gold)} gold answers do not score 1"
            if threshold is None
            else f"{len(gold_fail)}/{len(gold)} gold answers score under the threshold {threshold:g}"
        )
    if gold and len(gold_fail) == len(gold):
        flags.append("too hard: the verifier rejects every gold answer (check the answer format / column)")
        if template:
            # The golds are the audit's own rendering; a verifier that reads another format is not broken.
            shown = template.replace("\n", "\\n")
            flags.append(
                f"the gold answers were written as '{shown}': if your verifier expects another format, "
                f"rerun with --gold-template '...{{answer}}...' written the way your completions are"
            )
    if adv_fail and threshold is None:
        names = sorted({r.probe for r in adv_fail})
        flags.append(f"{len(adv_fail)}/{len(adversarial)} adversarial probes get reward: {', '.join(names)}")
    over = [a for a in rates if a.rate > max_false_positive]
    if over and threshold is not None:
        shown = ", ".join(f"{a.attack} {a.rate:.0%}" for a in over)
        flags.append(f"{len(over)} attack(s) get through above the false-positive rate {max_false_positive:g}: {shown}")
    if adversarial and len(adv_fail) >= 0.8 * len(adversarial):
        flags.append("too easy: the verifier rewards most adversarial completions (>= 80%), i.e. nearly anything")
    if length_bias is not None and length_bias.kind == "scores" and abs(length_bias.difference) > MAX_LENGTH_GAP:
        flags.append(
            f"length bias: the correct answer after filler scores {length_bias.difference:+.2f} against the same "
            f"answer alone (mean {length_bias.long:.2f} vs {length_bias.short:.2f}); they should score alike"
        )
    if length_bias is not None and length_bias.kind == "preference" and abs(length_bias.difference) > MAX_LENGTH_GAP:
        flags.append(
            f"length bias: P(the padded correct answer is better than the same answer alone) = {length_bias.long:.2f}"
        )
    if consistency is not None and consistency < 1.0:
        flags.append(
            f"position consistency {consistency:.0%}: the other comparisons were judged differently in the two "
            f"orders (make-pairs uses none of them as a preference)"
        )
    if calibration is not None and calibration.verdict != "ok":
        flags.append(
            f"{calibration.verdict}: {calibration.pass_fraction:.0%} of {calibration.n_samples} sampled completions pass"
        )
    return tuple(flags)


def _build(verifier_name: str, family: str, options: Mapping[str, Any]) -> Any:
    if family != "pairwise":
        return load(verifier_name, **options)
    if verifier_name != PairwiseJudge.name:
        raise ValueError(
            f"the pairwise probe family audits a pairwise judge (--verifier {PairwiseJudge.name}), not {verifier_name!r}"
        )
    return PairwiseJudge(**options)


def run_audit(
    verifier_name: str,
    options: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    sampled: Sequence[Sequence[str]] | None = None,
    *,
    family: str | None = None,
    probe_rows: int = 3,
    gold_template: str | None = None,
    threshold: float | None = None,
    max_false_positive: float | None = None,
) -> AuditReport:
    """Audit `load(verifier_name, **options)` on `rows`; `sampled[i]` are model completions for
    row i. `family` picks the probe set (default: from the verifier name); `probe_rows` is how many rows
    get the adversarial probes; `gold_template` (with `{answer}`) overrides how gold answers are written.
    Judge families: `threshold` (default `judge_threshold(options)`) and `max_false_positive` (default 0.1;
    a verifier's is 0) as in the module docstring; ``pairwise_judge`` builds a `PairwiseJudge`."""
    if not rows:
        raise ValueError("no rows to audit")
    if verifier_name == "overlong":
        raise ValueError("overlong is a length penalty, not a correctness check; there is nothing to audit")
    start = time.monotonic()
    fam = family or family_of(verifier_name)
    judged = fam in JUDGE_FAMILIES
    if threshold is not None and not judged:
        raise ValueError(
            "threshold applies to a judge's probe families (judge, pairwise); a verifier fails on any reward"
        )
    cut = (threshold if threshold is not None else judge_threshold(options)) if judged else None
    tolerance = max_false_positive if max_false_positive is not None else JUDGE_MAX_FALSE_POSITIVE if judged else 0.0
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"max_false_positive must be in [0, 1], got {tolerance}")
    if fam == "pairwise" and sampled is not None:
        raise ValueError("a pairwise judge scores no single completion: sampling (--model) does not apply")
    template = gold_template or gold_template_of(fam)
    verifier = _build(verifier_name, fam, options)
    bias = consistency = None
    try:
        with tempfile.TemporaryDirectory(prefix="posttrain-audit-") as workdir:
            gold = [] if fam == "pairwise" else _score_gold(verifier, fam, options, rows, gold_template, cut)
            if fam != "code" and not any(r.get(gold_column(fam, options, r)) is not None for r in rows):
                # Otherwise a misnamed gold column would give a clean report with nothing checked.
                column = gold_column(fam, options, rows[0])
                where = "reference_column" if fam in JUDGE_FAMILIES else "answer_column"
                raise ValueError(f"no row has the gold column {column!r} (set the verifier's {where} option)")
            if fam == "pairwise":
                adversarial, bias, consistency = _score_pairwise(verifier, options, rows, probe_rows, template)
            else:
                adversarial = _score_probes(verifier, fam, options, rows, probe_rows, Path(workdir), cut, gold_template)
                if fam == "judge":
                    bias = _pointwise_length_bias(verifier, fam, options, rows, probe_rows, template)
        calibration = _calibrate(verifier, rows, sampled, cut) if sampled is not None else None
    finally:
        closer = getattr(verifier, "close", None)
        if callable(closer):
            closer()
    rates = attack_rates(adversarial, pairwise=fam == "pairwise")
    identity = getattr(verifier, "identity", None)
    return AuditReport(
        verifier=_display_name(verifier) if ":" in verifier_name else verifier_name,
        options=dict(options),
        family=fam,
        n_rows=len(rows),
        gold=tuple(gold),
        adversarial=tuple(adversarial),
        calibration=calibration,
        flags=_flags(
            gold,
            adversarial,
            calibration,
            template,
            family=fam,
            rates=rates,
            max_false_positive=tolerance,
            threshold=cut,
            length_bias=bias,
            consistency=consistency,
        ),
        seconds=time.monotonic() - start,
        gold_template=template,
        threshold=cut,
        max_false_positive=tolerance,
        attack_rates=tuple(rates),
        length_bias=bias,
        position_consistency=consistency,
        identity=identity() if callable(identity) else None,
    )
