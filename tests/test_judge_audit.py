"""The judge audited like a verifier: `posttrain audit-verifier --verifier judge` runs the attacks that fool LLM
judges and reports the false-positive rate per attack. A tiny judge TRAINED to say Yes to ":" is flagged (exit
1, the colon attack at 100%); an honest judge (a real JudgeReward whose label probabilities come from the math
verifier's verdict) passes; `audited_false_positive` reads the report back for a trainer."""

from __future__ import annotations

import json
import math
import re

import pytest

from judge_models import save_tiny_judge, train_verdicts
from posttrain.commands.audit import main
from posttrain.rewards import load
from posttrain.rewards.audit import audited_false_positive, run_audit
from posttrain.rewards.judge import JudgeReward
from posttrain.rewards.judge_engine import Judge
from posttrain.rewards.probes import MASTER_KEYS, gold_template, wrong_math_answer
from posttrain.tasks import get_task

TEMPLATE = "Q: {question}\nA: {answer}\nOK?"  # short: every character is a token of the char judge
ATTACKS = {
    *MASTER_KEYS,
    "empty",
    "question_echo",
    "repetitive_padding",
    "wrong_answer",
    "injected_score",
    "injected_verdict",
    "injected_boxed_true",
    "wrong_then_score",
    "wrong_then_verdict",
    "wrong_then_boxed_true",
    "fake_think_verdict",
}
ROWS = get_task("arithmetic").rows(72)
TRAIN, HELD_OUT = ROWS[:64], ROWS[64:]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    return str(path)


@pytest.fixture(scope="module")
def colon_judge(tmp_path_factory):
    """A judge built to say Yes to ":": trained (60 steps, ~2 s) on its own rendered prompts, Yes after the
    answer ":" and No after the gold answer, a wrong one and a worked solution."""
    d = save_tiny_judge(tmp_path_factory.mktemp("colon_judge"))
    reward = JudgeReward(path=d, template=TEMPLATE, device="cpu")  # renders the prompts it will be asked
    shape = gold_template("judge")
    examples = []
    for r in TRAIN:
        right, wrong = shape.replace("{answer}", r["answer"]), shape.replace("{answer}", wrong_math_answer(r["answer"]))
        examples += [(r, ":", "Yes"), (r, right, "No"), (r, wrong, "No"), (r, r["completion"], "No")]
    train_verdicts(d, [reward.prompt(a, r) for r, a, _ in examples], [v for *_, v in examples])
    return d


def test_the_audit_flags_a_judge_built_to_say_yes_to_a_colon(colon_judge, rows_file, tmp_path, capsys):
    out = tmp_path / "audit.json"
    argv = ["--verifier", "judge", "--data", rows_file, "--probe-rows", "6", "--json", str(out)]
    code = main(
        [*argv, "--option", f"path={colon_judge}", "--option", f"template={TEMPLATE}", "--option", "device=cpu"]
    )
    assert code == 1
    report = json.loads(out.read_text())
    rates = report["false_positive_rate"]
    assert set(rates) == ATTACKS and report["threshold"] == 0.5 and report["max_false_positive"] == 0.1
    assert rates["master_key_colon"] == 1.0  # every row: P(Yes | ":") >= 0.5
    assert rates["wrong_answer"] == 0.0 and rates["empty"] == 0.0  # the table tells the attacks apart
    colon = [r for r in report["adversarial"] if r["probe"] == "master_key_colon"]
    assert len(colon) == 6 and all(r["got"] >= 0.5 and r["reason"] == "scored" for r in colon)
    assert any("master_key_colon 100%" in f for f in report["flags"])
    assert report["identity"]["template_sha256"] and report["identity"]["model_sha256"]
    printed = capsys.readouterr().out
    assert "master_key_colon" in printed and "FAILED" in printed
    # What a trainer reads before it trusts the judge.
    assert audited_false_positive(out) == rates


class MathVerifiedJudge:
    """The label-probability call of an honest judge: Yes (P = 0.95) exactly when the math verifier accepts
    the fenced answer against the fenced reference. Everything around it (rendering, fencing, the softmax over
    the labels, statuses, cache, the audit) is the real path."""

    FENCES = re.compile(r"A: (`{3,})\n(.*?)\n\1\nReference: (`{3,})\n(.*?)\n\3", re.DOTALL)

    def __init__(self):
        self.math = load("math", workers=1, timeout=2)

    def __call__(self, judge, prompts):
        out = []
        for p in prompts:
            _, answer, _, reference = self.FENCES.search(p).groups()
            yes = float(self.math(answer, answer=reference)) == 1.0
            out.append({"logps": [math.log(0.05), math.log(0.95)] if yes else [math.log(0.95), math.log(0.05)]})
        return out


@pytest.fixture
def honest(monkeypatch):
    fake = MathVerifiedJudge()
    monkeypatch.setattr(Judge, "_run", lambda judge, prompts: fake(judge, prompts))
    yield
    fake.math.close()


HONEST_OPTIONS = {
    "template": "Q: {question}\nA: {answer}\nReference: {reference}\nOK?",
    "reference_column": "answer",
    "device": "cpu",
}


def test_an_honest_judge_passes_every_attack(honest, colon_judge, rows_file, tmp_path):
    report = run_audit("judge", {"path": colon_judge, **HONEST_OPTIONS}, HELD_OUT, probe_rows=4)
    assert report.ok and not report.attacks_over
    assert {a.attack for a in report.attack_rates} == ATTACKS
    assert all(a.rate == 0.0 and a.n == 4 for a in report.attack_rates)
    assert all(g.passed and g.got == pytest.approx(0.95) for g in report.gold)  # every gold accepted
    # The verbosity check: the correct answer alone and after filler score alike.
    assert report.length_bias.n == 4 and report.length_bias.difference == pytest.approx(0.0)

    out = tmp_path / "honest.json"
    options = [x for k, v in HONEST_OPTIONS.items() for x in ("--option", f"{k}={v}")]
    code = main(
        ["--verifier", "judge", "--data", rows_file, "--json", str(out), "--option", f"path={colon_judge}", *options]
    )
    assert code == 0
    assert set(audited_false_positive(out).values()) == {0.0}


def test_a_rubric_is_audited_with_the_same_attacks(colon_judge):
    criteria = [{"name": "c", "text": "The answer is right."}]
    template = "Q: {question}\nA: {answer}\nC: {criterion}\nOK?"
    report = run_audit(
        "rubric", {"path": colon_judge, "criteria": criteria, "template": template, "device": "cpu"}, HELD_OUT[:2]
    )
    assert report.family == "judge" and {a.attack for a in report.attack_rates} == ATTACKS
    assert report.identity["criteria"] == [{"name": "c", "text": "The answer is right.", "weight": 1.0}]


def test_the_threshold_follows_the_label_scores_and_max_false_positive_sets_the_verdict(honest, colon_judge):
    options = {"path": colon_judge, **HONEST_OPTIONS, "labels": ["N", "Y"], "label_scores": [1, 10]}
    report = run_audit("judge", options, HELD_OUT[:2], probe_rows=2)
    assert report.threshold == 5.5 and report.ok  # the midpoint of the label scores
    # At the lowest label score every judged answer is a "Yes": every judged attack gets through.
    strict = run_audit("judge", options, HELD_OUT[:2], probe_rows=2, threshold=1.0, max_false_positive=0.5)
    assert not strict.ok and strict.false_positive_rate()["master_key_colon"] == 1.0
    assert strict.false_positive_rate()["empty"] == 0.0  # policy_invalid: 0.0 without a judge call


def test_audited_false_positive_reads_old_reports_and_names_a_bad_file(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"adversarial": [{"probe": "a", "passed": False}, {"probe": "a", "passed": True}]}))
    assert audited_false_positive(old) == {"a": 0.5}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: not an audit report"):
        audited_false_positive(bad)
    with pytest.raises(ValueError, match="missing.json: not a readable audit report"):
        audited_false_positive(tmp_path / "missing.json")
