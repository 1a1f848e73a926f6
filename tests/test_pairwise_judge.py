"""Pairwise judging for preference data (RLAIF): every comparison judged in both orders and averaged; a
position-biased judge's inconsistent comparisons are "no preference"; a judge failure in either order never
becomes a preference (TRL's -1 -> 2 after an order swap); a judge that prefers the correct answer yields pairs
with the correct answer chosen; judge-made pairs train DPO in the pipeline."""

from __future__ import annotations

import json
import math
import random
import re
import string

import pytest

from judge_models import save_tiny_judge, train_verdicts
from posttrain.commands.main import main
from posttrain.config import ConfigError, config_from_dict
from posttrain.models.tiny import build_tiny_model, build_tokenizer
from posttrain.pipeline.pairs import format_stats, make_pairs
from posttrain.pipeline.stages import PipelineConfig, plan, run
from posttrain.rewards.audit import audited_false_positive, run_audit
from posttrain.rewards.base import JUDGE_FAILED, SCORED
from posttrain.rewards.judge_engine import Judge, Verdict
from posttrain.rewards.pairwise import INCONSISTENT, PREFERRED, TIE, PairwiseJudge, combine, consistency_rate
from posttrain.run.preflight import pipeline_problems
from posttrain.runtime.tracking import read_metrics
from posttrain.tasks import get_task
from toy_rewards import parity

TEMPLATE = "Q: {question}\nA: {answer_a}\nB: {answer_b}\nBetter?"  # short: a char judge reads every character
PROMPT = re.compile(r"Q: (.*?)\nA: (`{3,})\n(.*?)\n\2\nB: (`{3,})\n(.*?)\n\4\nBetter\?", re.DOTALL)
ROWS = get_task("arithmetic").rows(8)


@pytest.fixture(scope="module")
def policy():
    tok = build_tokenizer("char")
    return build_tiny_model("tiny", tok, seed=0), tok


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, policy):
    d = tmp_path_factory.mktemp("policy")
    policy[0].save_pretrained(d)
    policy[1].save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return save_tiny_judge(tmp_path_factory.mktemp("judge"))


@pytest.fixture(scope="module")
def always_a(tmp_path_factory):
    """A real judge model trained (40 steps) to answer "A" whatever the answers: pure position bias."""
    d = save_tiny_judge(tmp_path_factory.mktemp("always_a"))
    judge = PairwiseJudge(path=d, template=TEMPLATE, device="cpu")
    rng = random.Random(0)
    words = ["".join(rng.choices(string.printable[:94], k=rng.randint(1, 8))) for _ in range(64)]
    prompts = [judge.prompt(r, rng.choice(words), rng.choice(words)) for r in get_task("arithmetic").rows(64)]
    train_verdicts(d, prompts, ["A"] * len(prompts), steps=40)
    return d


def _answers(prompt: str) -> tuple[str, str, str]:
    question, _, a, _, b = PROMPT.search(prompt).groups()
    return question, a, b


def _logps(p_a: float) -> list[float]:
    return [math.log(p_a), math.log(1 - p_a)]


def _judge_by(monkeypatch, decide):
    """Replace ONLY the judge's label-probability call: ``decide(question, answer_a, answer_b)`` gives the raw
    output (``{"logps": [log P(A), log P(B)]}`` or ``{"text": ...}``); rendering, fences, the softmax over the
    labels, statuses, cache, both orders and their combination stay the real code."""
    monkeypatch.setattr(Judge, "_run", lambda self, prompts: [decide(*_answers(p)) for p in prompts])


# --- the combination rule -------------------------------------------------------------------------------------


def _v(p_a: float | None) -> Verdict:
    return Verdict(math.nan, JUDGE_FAILED, None, "no label") if p_a is None else Verdict(p_a, SCORED, "A")


@pytest.mark.parametrize(
    "xy, yx, status, winner",
    [
        (0.9, 0.2, PREFERRED, 0),  # x first: x better; y first: y worse -> x, in both orders
        (0.3, 0.8, PREFERRED, 1),
        (0.9, 0.9, INCONSISTENT, None),  # "A" both times: the position won, not an answer
        (0.1, 0.1, INCONSISTENT, None),
        (0.55, 0.5, TIE, None),  # orders agree, average 0.525: within the margin
        (0.5, 0.5, TIE, None),
        (0.9, None, JUDGE_FAILED, None),  # TRL: -1 after the swap became 1 - (-1) = 2 = "the second wins"
        (None, 0.1, JUDGE_FAILED, None),
        (None, None, JUDGE_FAILED, None),
    ],
)
def test_both_orders_combine_and_a_failure_is_never_a_preference(xy, yx, status, winner):
    v = combine(_v(xy), _v(yx), margin=0.1)
    assert (v.status, v.winner) == (status, winner)
    if status == JUDGE_FAILED:
        assert math.isnan(v.preference) and v.confidence == 0.0
    else:
        assert v.preference == pytest.approx((xy + 1 - yx) / 2)
    assert consistency_rate([v]) == (None if status == JUDGE_FAILED else float(status in (PREFERRED, TIE)))


def test_pairwise_options_are_refused_before_weights_load(judge_dir, monkeypatch):
    monkeypatch.setattr(Judge, "__init__", lambda *a, **k: pytest.fail("the judge was built before its options"))
    with pytest.raises(ValueError, match=r"pairwise_judge option template has no \{answer_b\}"):
        PairwiseJudge(path=judge_dir, template="{question} {answer_a}")
    with pytest.raises(ValueError, match="pairwise_judge option labels must be two labels"):
        PairwiseJudge(path=judge_dir, labels=["A", "B", "C"])
    with pytest.raises(ValueError, match=r"margin must be in \[0, 0.5\)"):
        PairwiseJudge(path=judge_dir, margin=0.5)


def test_the_prompt_fences_both_answers_and_swaps_them(judge_dir):
    judge = PairwiseJudge(path=judge_dir, template=TEMPLATE, device="cpu")
    first = judge.prompt({"prompt": "1+1="}, "``` x", "2 {answer_b}")
    assert _answers(first) == ("1+1=", "``` x", "2 {answer_b}")  # fenced, braces left alone (one-pass fill)
    assert _answers(judge.prompt({"prompt": "1+1="}, "2 {answer_b}", "``` x"))[1:] == ("2 {answer_b}", "``` x")


# --- make_pairs with a judge -----------------------------------------------------------------------------------


def test_a_judge_that_always_answers_a_gives_no_pairs_and_zero_consistency(policy, always_a):
    model, tok = policy
    judge = PairwiseJudge(path=always_a, template=TEMPLATE, device="cpu")
    seen = judge.compare([ROWS[0]] * 2, ["7", "x+y"], ["13", "?"])
    assert all(v.first > 0.5 and v.second < 0.5 and v.status == INCONSISTENT for v in seen)  # P("A") > 0.5 always

    out, stats = make_pairs(model, tok, ROWS, None, 4, max_new_tokens=6, seed=0, judge=judge)
    assert out == [] and stats.pairs == 0
    assert stats.ranked_by == "judge" and stats.judged > 0
    assert stats.inconsistent == stats.judged and stats.preferred == stats.ties == stats.judge_failed == 0
    assert stats.position_consistency == 0.0
    assert stats.skipped_no_preference + stats.skipped_too_few == len(ROWS)
    assert "position consistency: 0.0%" in format_stats(stats, False)


@pytest.mark.parametrize("mode", ["probs", "text"])
def test_a_failure_in_either_order_never_becomes_a_preference(policy, judge_dir, monkeypatch, mode):
    """With the lexically smaller answer in position A the judge says "A" (that answer better); with the
    orders swapped it gives no verdict (TRL's -1). TRL's swap made that "the second wins"; here no pair."""

    def decide(question, a, b):
        if a < b:
            return {"logps": _logps(0.99)} if mode == "probs" else {"text": "A"}
        return {"logps": [-30.0, -30.0]} if mode == "probs" else {"text": "-1"}

    _judge_by(monkeypatch, decide)
    judge = PairwiseJudge(path=judge_dir, template=TEMPLATE, mode=mode, min_label_mass=0.5, device="cpu")
    model, tok = policy
    out, stats = make_pairs(model, tok, ROWS, None, 4, max_new_tokens=6, seed=0, judge=judge)
    assert out == [] and stats.judged > 0 and stats.judge_failed == stats.judged
    assert stats.position_consistency is None  # nothing judged in both orders: no rate, not 100%
    assert "judge failures" in format_stats(stats, False)


def test_a_judge_that_prefers_the_correct_answer_chooses_it(policy, judge_dir, monkeypatch):
    """Correct = the toy parity verifier on the row's answer: the judge prefers the correct answer (P = 0.8 for
    the answer in position A when only it is correct), and is indifferent between two of a kind."""
    answer_of = {r["prompt"]: r["answer"] for r in ROWS}

    def decide(question, a, b):
        ok_a, ok_b = (parity(x, answer_of[question]) == 1.0 for x in (a, b))
        return {"logps": _logps(0.5 if ok_a == ok_b else 0.8 if ok_a else 0.2)}

    _judge_by(monkeypatch, decide)
    judge = PairwiseJudge(path=judge_dir, template=TEMPLATE, device="cpu")
    model, tok = policy
    out, stats = make_pairs(model, tok, ROWS, None, 6, max_new_tokens=6, seed=0, judge=judge, pairs_per_prompt=2)
    assert out and stats.pairs == len(out)
    for r in out:
        assert parity(r["chosen"], r["answer"]) == 1.0 and parity(r["rejected"], r["answer"]) == 0.0
        assert r["chosen"] != r["rejected"]
    assert stats.position_consistency == 1.0 and stats.inconsistent == 0
    assert stats.preferred + stats.ties == stats.judged and stats.ties > 0  # two of a kind: a tie, no pair
    # Both orders of every comparison were asked: 2 calls per comparison (the cache adds none).
    assert judge.cache_misses + judge.cache_hits == 2 * stats.judged


def test_make_pairs_cli_with_a_judge(policy_dir, always_a, tmp_path, capsys):
    out, stats = tmp_path / "pairs.jsonl", tmp_path / "stats.json"
    base = ["make-pairs", "--model", policy_dir, "--data", "builtin:arithmetic", "--num-examples", "4"]
    base += ["-n", "3", "--max-new-tokens", "6", "--out", str(out), "--device", "cpu"]
    judge = ["--judge", always_a, "--judge-option", f"template={TEMPLATE}", "--judge-margin", "0.2"]
    assert main([*base, *judge, "--stats", str(stats)]) == 0
    printed = capsys.readouterr().out
    assert "pairs: 0" in printed and "position consistency: 0.0%" in printed
    saved = json.loads(stats.read_text())
    assert saved["ranked_by"] == "judge" and saved["position_consistency"] == 0.0

    with pytest.raises(SystemExit):  # a verdict per sample needs a verifier
        main([*base, *judge, "--kto"])
    assert "--kto and --gold-column need a verifier" in capsys.readouterr().err
    bad = ["--judge", always_a, "--judge-option", "template={question} {answer_a}"]
    assert main([*base, *bad]) == 1
    assert "pairwise_judge option template has no {answer_b}" in capsys.readouterr().err


# --- the pipeline: RLAIF pairs -> DPO ----------------------------------------------------------------------------


def _pipeline(tmp_path, policy_dir, judge, **make_pairs_extra):
    return {
        "output_dir": str(tmp_path / "pipe"),
        "eval": {"data": "builtin:arithmetic", "examples": 4, "k": 0, "max_new_tokens": 6},
        "stages": [
            {
                "name": "dpo",
                "recipe": "preference",
                "config": {
                    "model": policy_dir,
                    "data": {"eval_fraction": 0},
                    "optim": {"lr": 1e-3},
                    "train": {"steps": 2, "micro_batch_size": 4, "progress": False},
                },
                "make_pairs": {
                    "data": "builtin:arithmetic",
                    "n": 4,
                    "limit": 8,
                    "max_new_tokens": 6,
                    "pairwise_judge": judge,
                    "pairwise_judge_options": {"template": TEMPLATE, "device": "cpu"},
                    **make_pairs_extra,
                },
            }
        ],
    }


def test_judge_pairs_train_dpo_in_the_pipeline(tmp_path, policy_dir, judge_dir, monkeypatch):
    """A judge that prefers the shorter answer (both orders agree) makes the pairs; the preference stage trains."""
    _judge_by(
        monkeypatch, lambda q, a, b: {"logps": _logps(0.5 if len(a) == len(b) else 0.9 if len(a) < len(b) else 0.1)}
    )
    summary = run(config_from_dict(PipelineConfig, _pipeline(tmp_path, policy_dir, judge_dir)))
    stage = tmp_path / "pipe" / summary["stages"][0]["dir"]
    pairs = [json.loads(line) for line in (stage / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(len(p["chosen"]) < len(p["rejected"]) for p in pairs)
    stats = json.loads((stage / "pairs_stats.json").read_text())
    assert stats["ranked_by"] == "judge" and stats["pairs"] == len(pairs) and stats["position_consistency"] == 1.0
    assert "skipped" not in summary["stages"][0]  # it trained, not passed through
    m = read_metrics(stage)
    assert len(m) == 2 and m[0]["rewards/margin"] == 0.0 and m[1]["rewards/margin"] != 0.0
    assert (stage / "final" / "COMPLETE").exists()


def test_pipeline_judge_config_is_checked_and_may_name_an_earlier_stage(tmp_path, policy_dir, judge_dir):
    data = _pipeline(tmp_path, policy_dir, "judge")
    sft = {"name": "judge", "recipe": "sft", "config": {"model": policy_dir, "train": {"steps": 1}}}
    data["stages"] = [sft, data["stages"][0]]
    cfg = config_from_dict(PipelineConfig, data)
    plans = plan(cfg)
    assert plans[1].pairs.pairwise_judge == str(plans[0].final)  # the judge stage's exported model
    assert not [p for p in pipeline_problems(cfg, plans) if "pairwise_judge" in p]  # written before it is used

    missing = config_from_dict(PipelineConfig, _pipeline(tmp_path, policy_dir, str(tmp_path / "nowhere")))
    (problem,) = [p for p in pipeline_problems(missing, plan(missing)) if "pairwise_judge" in p]
    assert "make_pairs.pairwise_judge=" in problem and "no readable config.json" in problem
    with pytest.raises(ConfigError, match="pairwise_judge gives preferences between samples"):
        config_from_dict(PipelineConfig, _pipeline(tmp_path, policy_dir, judge_dir, kto=True))


# --- the audit of a pairwise judge: each attack against the gold answer, in both orders ----------------------------


def test_the_audit_reports_a_position_biased_judges_consistency(always_a):
    report = run_audit("pairwise_judge", {"path": always_a, "template": TEMPLATE, "device": "cpu"}, ROWS, probe_rows=2)
    assert report.family == "pairwise" and report.position_consistency == 0.0
    assert all(r.reason == INCONSISTENT for r in report.adversarial)  # the attack never wins: no preference at all
    assert report.ok and set(report.false_positive_rate().values()) == {0.0}
    assert "empty" not in report.false_positive_rate()  # make-pairs never judges an empty sample
    assert all(a.consistency == 0.0 for a in report.attack_rates)
    assert any("position consistency 0%" in f for f in report.flags)


def test_the_audit_flags_a_pairwise_judge_that_prefers_the_longer_answer(judge_dir, monkeypatch, tmp_path):
    _judge_by(
        monkeypatch, lambda q, a, b: {"logps": _logps(0.5 if len(a) == len(b) else 0.9 if len(a) > len(b) else 0.1)}
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "audit.json"
    argv = ["audit-verifier", "--verifier", "pairwise_judge", "--data", str(rows), "--json", str(out)]
    assert (
        main([*argv, "--option", f"path={judge_dir}", "--option", f"template={TEMPLATE}", "--option", "device=cpu"])
        == 1
    )
    report = json.loads(out.read_text())
    rates = report["false_positive_rate"]
    assert rates["repetitive_padding"] == 1.0 and rates["master_key_colon"] == 0.0
    assert report["position_consistency"] == 1.0
    assert report["length_bias"]["long"] == pytest.approx(0.9) and report["length_bias"]["kind"] == "preference"
    assert audited_false_positive(out) == rates
