"""The verifier audit behind `posttrain audit-verifier` (the command line is `posttrain.commands.audit`).

Three questions, each answered from data rather than trust:
  1. Does every gold answer score 1? (A verifier that rejects golds teaches nothing; a mismatch usually
     means the gold format and the extraction disagree.)
  2. Does every adversarial completion score 0? (probes.py: hedges, empty/huge inputs, injection, code
     exit/equality/monkeypatch tricks.) Any reward there is a hack waiting for the policy to find it.
  3. Optionally, on completions sampled from the model to be trained: what fraction passes? ~all means
     the task (or the verifier) is too easy to give a learning signal; none means too hard.

Exit status: 0 when golds all pass and no probe gets reward, 1 otherwise, 2 on a usage or data error.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .base import score_all
from .base import verifier_name as _display_name
from .probes import Probe, adversarial_probes, family_of, gold_column, render_gold
from .probes import gold_template as gold_template_of
from .registry import load

_ONE = 1.0 - 1e-9


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    kind: Literal["gold", "adversarial"]
    row: int
    expected: float  # gold: the score must reach this; adversarial: the score must not exceed it
    got: float
    passed: bool
    reason: str


@dataclass(frozen=True)
class Calibration:
    n_prompts: int
    n_samples: int
    pass_fraction: float  # samples scoring 1
    mean_reward: float
    prompts_all_pass: float  # fraction of prompts whose every sample scores 1
    prompts_none_pass: float
    verdict: Literal["ok", "too easy", "too hard"]


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

    @property
    def gold_failures(self) -> tuple[ProbeResult, ...]:
        return tuple(r for r in self.gold if not r.passed)

    @property
    def adversarial_failures(self) -> tuple[ProbeResult, ...]:
        return tuple(r for r in self.adversarial if not r.passed)

    @property
    def ok(self) -> bool:
        return not self.gold_failures and not self.adversarial_failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["n_gold_failures"] = len(self.gold_failures)
        out["n_adversarial_failures"] = len(self.adversarial_failures)
        return out


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
    verifier: Any, family: str, options: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], template: str | None
) -> list[ProbeResult]:
    index, completions = [], []
    for i, row in enumerate(rows):
        text = render_gold(family, options, row, template)
        if text is not None:
            index.append(i)
            completions.append(text)
    scores = score_all(verifier, completions, [rows[i] for i in index])
    return [
        ProbeResult("gold", "gold", i, 1.0, float(s), bool(float(s) >= _ONE), _reason(s)) for i, s in zip(index, scores)
    ]


def _score_probes(
    verifier: Any,
    family: str,
    options: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    probe_rows: int,
    workdir: Path,
) -> list[ProbeResult]:
    labels = _labels(options, rows, family)
    planned: list[tuple[int, Probe]] = []
    for i, row in enumerate(rows[:probe_rows]):
        marker = str(workdir / f"pwned_row{i}")
        probes = adversarial_probes(family, options, row, marker, labels)
        extra = getattr(verifier, "adversarial_probes", None)  # a verifier may add its own (e.g. code)
        if callable(extra):
            probes += [Probe(name, text) for name, text in extra(row)]
        planned += [(i, p) for p in probes]
    scores = score_all(verifier, [p.completion for _, p in planned], [rows[i] for i, _ in planned])
    results = []
    for (i, probe), score in zip(planned, scores):
        value = float(score)
        reason = _reason(score)
        passed = not (value > 0.0) and not math.isnan(value)
        if probe.marker is not None and Path(probe.marker).exists():
            passed, reason = False, f"INJECTED CODE RAN: {probe.marker} was created"
        results.append(ProbeResult(probe.name, "adversarial", i, 0.0, value, passed, reason))
    return results


def _calibrate(verifier: Any, rows: Sequence[Mapping[str, Any]], sampled: Sequence[Sequence[str]]) -> Calibration:
    if len(sampled) != len(rows):
        raise ValueError(f"sampled has {len(sampled)} groups for {len(rows)} rows")
    flat = [(i, c) for i, group in enumerate(sampled) for c in group]
    scores = [float(s) for s in score_all(verifier, [c for _, c in flat], [rows[i] for i, _ in flat])]
    per_prompt: list[list[bool]] = [[] for _ in rows]
    for (i, _), s in zip(flat, scores):
        per_prompt[i].append(s >= _ONE)
    groups = [g for g in per_prompt if g]
    passes = [s >= _ONE for s in scores]
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
    gold: list[ProbeResult], adversarial: list[ProbeResult], calibration: Calibration | None, template: str = ""
) -> tuple[str, ...]:
    flags = []
    if not gold:
        flags.append("no gold answers checked (code rows need a `solution` column)")
    gold_fail = [r for r in gold if not r.passed]
    adv_fail = [r for r in adversarial if not r.passed]
    if gold_fail:
        flags.append(f"{len(gold_fail)}/{len(gold)} gold answers do not score 1")
    if gold and len(gold_fail) == len(gold):
        flags.append("too hard: the verifier rejects every gold answer (check the answer format / column)")
        if template:
            # The golds are the audit's own rendering; a verifier that reads another format is not broken.
            shown = template.replace("\n", "\\n")
            flags.append(
                f"the gold answers were written as '{shown}': if your verifier expects another format, "
                f"rerun with --gold-template '...{{answer}}...' written the way your completions are"
            )
    if adv_fail:
        names = sorted({r.probe for r in adv_fail})
        flags.append(f"{len(adv_fail)}/{len(adversarial)} adversarial probes get reward: {', '.join(names)}")
    if adversarial and len(adv_fail) >= 0.8 * len(adversarial):
        flags.append("too easy: the verifier rewards most adversarial completions (>= 80%), i.e. nearly anything")
    if calibration is not None and calibration.verdict != "ok":
        flags.append(
            f"{calibration.verdict}: {calibration.pass_fraction:.0%} of {calibration.n_samples} sampled completions pass"
        )
    return tuple(flags)


def run_audit(
    verifier_name: str,
    options: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    sampled: Sequence[Sequence[str]] | None = None,
    *,
    family: str | None = None,
    probe_rows: int = 3,
    gold_template: str | None = None,
) -> AuditReport:
    """Audit `load(verifier_name, **options)` on `rows`; `sampled[i]` are model completions for
    row i. `family` picks the probe set (default: from the verifier name); `probe_rows` is how many rows
    get the adversarial probes; `gold_template` (with `{answer}`) overrides how gold answers are written."""
    if not rows:
        raise ValueError("no rows to audit")
    if verifier_name == "overlong":
        raise ValueError("overlong is a length penalty, not a correctness check; there is nothing to audit")
    start = time.monotonic()
    fam = family or family_of(verifier_name)
    verifier = load(verifier_name, **options)
    try:
        with tempfile.TemporaryDirectory(prefix="posttrain-audit-") as workdir:
            gold = _score_gold(verifier, fam, options, rows, gold_template)
            if not gold and fam != "code":
                # Otherwise a misnamed gold column would give a clean report with nothing checked.
                column = gold_column(fam, options, rows[0])
                raise ValueError(f"no row has the gold column {column!r} (set the verifier's answer_column option)")
            adversarial = _score_probes(verifier, fam, options, rows, probe_rows, Path(workdir))
        calibration = _calibrate(verifier, rows, sampled) if sampled is not None else None
    finally:
        closer = getattr(verifier, "close", None)
        if callable(closer):
            closer()
    return AuditReport(
        verifier=_display_name(verifier) if ":" in verifier_name else verifier_name,
        options=dict(options),
        family=fam,
        n_rows=len(rows),
        gold=tuple(gold),
        adversarial=tuple(adversarial),
        calibration=calibration,
        flags=_flags(gold, adversarial, calibration, gold_template or gold_template_of(fam)),
        seconds=time.monotonic() - start,
        gold_template=gold_template or gold_template_of(fam),
    )
