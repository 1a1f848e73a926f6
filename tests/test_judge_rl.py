"""The judge reward inside RL: statuses reach the metrics, judge failures are excluded from the advantages, the
run record names the judge, and the judge data / judge stage path of the pipeline."""

import json

import pytest
import torch
import yaml

from posttrain.config import GRPOConfig, config_from_dict
from posttrain.models.tiny import build_tiny_model, build_tokenizer
from posttrain.pipeline.judge_data import hard_negatives, judge_messages, judge_rows, source_key
from posttrain.recipes import grpo
from posttrain.rewards.judge import DEFAULT_TEMPLATE, JudgeReward
from posttrain.rl.groups import Group
from posttrain.runtime.tracking import read_metrics


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    tok = build_tokenizer("char")
    model = build_tiny_model("tiny", tok, seed=3)
    with torch.no_grad():  # an opinionated judge: its verdict depends on the answer
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    d = tmp_path_factory.mktemp("judge")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _run(tmp_path, judge_dir, *extra):
    cfg = config_from_dict(
        GRPOConfig,
        {},
        [
            "model=tiny",
            "data.path=builtin:arithmetic",
            "data.num_examples=40",
            "data.max_length=48",
            f"train.output_dir={tmp_path}",
            "train.progress=false",
            "train.steps=2",
            "prompts_per_step=2",
            "num_generations=4",
            "max_completion_length=8",
            "train.micro_batch_size=8",
            f"rewards=[{{name: math, weight: 0}}, {{name: judge, options: {{path: {judge_dir}}}}}]",
            *extra,
        ],
    )
    grpo.train(cfg)
    return read_metrics(tmp_path)


def test_grpo_with_a_judge_records_it_and_logs_its_cache(tmp_path, judge_dir):
    m = _run(tmp_path, judge_dir)
    assert "reward/judge/mean" in m[-1] and m[-1]["reward/judge/cache_misses"] > 0
    assert m[-1]["reward/judge/scored"] > 0  # the share of samples the judge gave a verdict for
    record = json.loads((tmp_path / "rewards.json").read_text())
    judge = next(r for r in record if r["name"] == "judge")
    assert judge["identity"]["template_sha256"] and judge["weight"] == 1.0
    assert next(r for r in record if r["name"] == "math")["weight"] == 0.0


def test_judge_failures_under_exclude_never_train(tmp_path, judge_dir):
    # min_label_mass 0.5: an untrained judge puts far less on Yes + No, every call fails; exclude: no reward
    opts = f"{{path: {judge_dir}, min_label_mass: 0.5, on_failure: exclude, max_failure_rate: 1.0}}"
    m = _run(tmp_path, judge_dir, f"rewards=[{{name: math, weight: 0}}, {{name: judge, options: {opts}}}]")
    for step in m:
        assert step["reward/excluded"] == 1.0 and step["reward/judge/judge_failed"] == 1.0
        assert step["skipped_update"] == 1.0  # nothing to learn from, and nothing made up


def test_an_excluded_sample_is_out_of_the_baseline_and_the_loss():
    g = Group(
        0,
        (1, 2),
        ((3,), (4,), (5,), (6,)),
        ("a",) * 4,
        (False,) * 4,
        (1.0, 0.0, 0.0, 1.0),
        {},
        0,
        excluded=(False, False, True, False),
    )
    cfg = GRPOConfig()
    valid = torch.tensor([[True, True, False, True]])
    adv = grpo.compute_advantages(torch.tensor([g.rewards]), cfg, valid)
    assert adv[0, 2] == 0 and adv[0, 0] > 0 > adv[0, 1]
    kept = [k for _, k in grpo.sequences([g], mask_truncated=False)]
    assert kept == [True, True, False, True]
    assert g.has_variance and g.valid_rewards == (1.0, 0.0, 1.0)


def test_judge_rows_render_what_the_judge_reads_and_are_balanced(judge_dir):
    labelled = [{"prompt": "2+2=", "completion": c, "label": c == "4"} for c in ("4", "5", "6", "7")]
    rows, counts = judge_rows(labelled, seed=0)
    assert counts == {
        "yes": 1,
        "no": 3,
        "near_misses": 0,
        "swapped": 0,
        "written": 2,
    }  # balanced: the majority subsampled
    assert sorted(r["completion"][0]["content"] for r in rows) == ["No", "Yes"]
    judge = JudgeReward(path=str(judge_dir), cache=False)
    # the SFT prompt, through the judge's chat template, is exactly the prompt the judge scores
    tok = judge.judge.tok
    sft_prompt = tok.apply_chat_template(judge_messages("2+2=", "4"), tokenize=False, add_generation_prompt=True)
    assert sft_prompt == judge.prompt("4", {"prompt": "2+2="})
    assert "```\n4\n```" in judge_messages("2+2=", "4", DEFAULT_TEMPLATE)[0]["content"]


def test_training_against_a_judge_whose_audit_failed_warns_or_refuses(tmp_path, judge_dir, caplog):
    report = tmp_path / "audit.json"
    report.write_text(json.dumps({"adversarial": [], "false_positive_rate": {"master_key_colon": 0.9, "empty": 0.0}}))
    opts = f"{{path: {judge_dir}, audit: {report}, audit_policy: refuse}}"
    with pytest.raises(Exception, match="master_key_colon 90%"):
        _run(tmp_path / "refused", judge_dir, f"rewards=[{{name: math, weight: 0}}, {{name: judge, options: {opts}}}]")
    opts = f"{{path: {judge_dir}, audit: {report}}}"  # warn, the default
    with caplog.at_level("WARNING", logger="posttrain"):
        _run(tmp_path / "warned", judge_dir, f"rewards=[{{name: math, weight: 0}}, {{name: judge, options: {opts}}}]")
    assert "master_key_colon 90%" in caplog.text
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps({"adversarial": [], "false_positive_rate": {"master_key_colon": 0.0}}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="posttrain"):
        _run(
            tmp_path / "clean",
            judge_dir,
            f"rewards=[{{name: math, weight: 0}}, {{name: judge, options: {{path: {judge_dir}, audit: {clean}}}}}]",
        )
    assert "audit" not in caplog.text


def test_near_misses_are_negatives_the_verifier_rejects_and_never_outnumber_real_ones():
    rows = [
        {"prompt": "pay =>", "completion": " payment", "label": True},
        {"prompt": "pay =>", "completion": " termination", "label": False},
    ]
    sources = {source_key("pay =>"): {"prompt": "pay =>", "answer": "payment"}}
    negs = hard_negatives(rows, lambda c, answer=None, **ex: float(c.strip() == answer), sources)
    assert negs and all(not n["label"] and n["completion"].strip() != "payment" for n in negs)
    assert any(n["completion"] == ":" for n in negs)  # a master key is a negative too
    out, counts = judge_rows(rows + negs, seed=0)
    assert counts["near_misses"] == 2  # at most twice the real wrong samples (one here)
    assert counts["written"] == 2  # balanced: one Yes, one No
    no = next(r for r in out if r["completion"][0]["content"] == "No")
    assert "termination" in no["prompt"][-1]["content"]  # the real wrong sample is kept before any near miss


def test_answers_right_for_another_prompt_become_negatives_where_the_verifier_rejects_them():
    labels = ("payment", "termination", "prohibition")
    rows = [{"prompt": f"{x} =>", "completion": f" {x}", "label": True} for x in labels]
    rows.append({"prompt": "not pay =>", "completion": " prohibition", "label": True})
    sources = {source_key(r["prompt"]): {"prompt": r["prompt"], "answer": r["completion"].strip()} for r in rows}
    negs = hard_negatives(rows, lambda c, answer=None, **ex: float(c.strip() == answer), sources, swaps=5)
    swapped = {(n["prompt"], n["completion"]) for n in negs if n.get("swap")}
    # every other prompt's right answer, except where it is right here too (" prohibition" for "not pay")
    assert swapped == {
        (p, f" {x}") for p, y in [(r["prompt"], r["completion"].strip()) for r in rows] for x in labels if x != y
    }
    assert not any(n.get("near_miss") and n.get("swap") for n in negs)
    out, counts = judge_rows(rows + negs, seed=0)
    assert counts["swapped"] == len(swapped) == 8 and counts["written"] == 8  # 4 Yes, 4 No


def test_the_judge_demo_runs_end_to_end(tmp_path):
    from posttrain.commands.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--judge", "--fast", "--output", str(out)]) == 0
    summary = json.loads((out / "pipeline.json").read_text())
    judge = next(s for s in summary["stages"] if s["name"] == "judge")["eval"]
    assert judge["kind"] == "judge" and judge["n_judged"] > 0 and judge["identity"]["template_sha256"]
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft", "judge", "grpo_judge", "grpo"]
    assert (out / "stages" / "04_grpo_judge" / "rewards.json").exists()
    # the judge stage audits its judge: per-attack false-positive rates in its evaluation, the whole report in
    # audit.json, which the judge reward of grpo_judge names (audit: judge) and checks before training
    audit = judge["audit"]
    attacks = {a["attack"] for a in audit["attacks"]}
    assert {"master_key_colon", "empty", "injected_verdict", "fake_think_verdict"} <= attacks
    saved = json.loads((out / "stages" / "03_judge" / "audit.json").read_text())
    # the golds are written as the policy writes its answers, so the judge's label-set gate lets them through
    assert saved["gold_template"] == "{answer}" and not any(g["reason"] == "gated" for g in saved["gold"])
    assert all("rate_without_gates" in a for a in audit["attacks"])  # a gated judge is audited bare too
    assert saved["false_positive_rate"] == {a["attack"]: a["rate"] for a in audit["attacks"]}
    grpo_judge = yaml.safe_load((out / "stages" / "04_grpo_judge" / "config.yaml").read_text())
    judge_opts = next(r["options"] for r in grpo_judge["rewards"] if r["name"] == "judge")
    assert judge_opts["audit"] == str(out / "stages" / "03_judge" / "audit.json")
    html = (out / "report.html").read_text()
    assert "Audit: false-positive rate per attack" in html and "master_key_colon" in html
    assert "Judge verdicts (share of samples)" in html  # the judge's statuses per step, charted
    assert "A judge as the reward vs the verifier" in html  # the two GRPO branches' gains side by side


def test_a_judge_behind_a_gate_never_judges_what_the_gate_refuses(judge_dir):
    labels = "termination|payment|prohibition"
    judge = JudgeReward(path=str(judge_dir), gates=[{"name": "regex", "options": {"pattern": rf"\s*({labels})\s*"}}])
    scores = judge.score_batch([" payment", " paymnet", " confidentialiti"], [{"prompt": "q =>"}] * 3)
    assert [s.reason for s in scores] == ["scored", "gated", "gated"] and scores[1] == scores[2] == 0.0
    assert judge.cache_misses == 1  # the gated answers cost no judge call
    assert judge.identity()["gates"][0]["name"] == "regex"
