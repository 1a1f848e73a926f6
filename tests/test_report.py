"""The HTML report on synthetic run directories: self-contained, complete, escaped, tolerant of gaps."""

import json
import math
import re
from html import escape

import pytest
import yaml

from posttrain.commands.report import main
from posttrain.report import build_report
from posttrain.report.load import ReportError
from posttrain.report.svg import nice_ticks

XSS = "<script>alert(1)</script>"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _grpo_run(d, steps=30, verifiers=("math", "format")):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {"recipe": "grpo", "model": {"path": "tiny"}, "grpo": {"beta": 0.04, "group_size": 8}}, sort_keys=False
        )
    )
    rows = []
    for s in range(1, steps + 1):
        r = 0.1 + 0.8 * s / steps
        row = {
            "step": s,
            "reward/mean": r,
            "reward/std": 0.3,
            "accuracy": r * 0.9,
            "entropy": 1.5 - s / steps,
            "truncation_rate": 0.2 * (1 - s / steps),
            "completion_len/mean": 40 - s / 2,
            "completion_len/min": 10,
            "completion_len/max": 64,
            "kl": 0.001 * s,
            "loss": 0.05 * math.sin(s),
            "clip_frac/low": 0.01,
            "clip_frac/high": 0.02,
            "zero_variance_frac": 0.25,
            "gen_rounds": 1,
            "time/generate": 1.2,
            "time/reward": 0.1,
            "time/logps": 0.3,
            "time/update": 0.5,
            "wall_time": 2.1 * s,
            "grad_norm": "nan",
            "my_custom": s % 3,
        }  # the tracker writes non-finite floats as strings
        for v in verifiers:
            row[f"reward/{v}/mean"] = r
        if s % 10 == 0:
            row["eval_accuracy"] = r
        rows.append(row)
    _write_jsonl(d / "metrics.jsonl", rows)
    samples = []
    for s in (1, steps // 2, steps):
        for i in range(3):
            samples.append(
                {
                    "step": s,
                    "prompt": f"What is {i}+{s}?",
                    "reward": float(s == steps),
                    "completion": f"step{s}-completion{i} \\boxed{{{i + s}}}",
                }
            )
    samples[0]["completion"] = XSS
    _write_jsonl(d / "samples.jsonl", samples)
    # One expected chart per CHARTS entry whose metrics were written (grad_norm has only "nan": no chart).
    return {
        "Reward",
        "Accuracy",
        "Entropy",
        "Truncation rate",
        "Completion length (tokens)",
        "KL to reference",
        "Loss",
        "Clip fraction",
        "Zero-variance groups",
        "Generation rounds per step",
    }


def _sft_run(d, recipe="sft", steps=20):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"recipe": recipe, "optim": {"lr": 3e-4}}))
    rows = [
        {"step": s, "loss": 3.0 / s, "lr": 3e-4 * min(1, s / 5), "grad_norm": 1.0 / s, "tokens_per_s": 12000.0}
        for s in range(1, steps + 1)
    ]
    rows[9]["eval_loss"] = 0.5
    rows[19]["eval_loss"] = 0.3
    _write_jsonl(d / "metrics.jsonl", rows)
    return {"Loss", "Gradient norm", "Learning rate", "Throughput (tokens/s)"}


def _eval(acc, n=200, samples=None):
    half = 1.96 * math.sqrt(acc * (1 - acc) / n)
    ev = {
        "greedy_accuracy": acc,
        "greedy_ci": [max(0, acc - half), min(1, acc + half)],
        "n_prompts": n,
        "pass_at_k": min(1, acc + 0.2),
        "maj_at_k": acc + 0.05,
        "mean_at_k": acc - 0.02,
        "k": 8,
    }
    if samples is not None:
        ev["samples"] = samples
    return ev


def _eval_samples(tag, rewards):
    return [
        {"prompt": f"q{i}: 2+{i}=?", "completion": f"{tag} answer {i}", "reward": r, "answer": str(2 + i)}
        for i, r in enumerate(rewards)
    ]


def _chart_ids(html):
    return re.findall(r'<svg class="chart" data-chart="([^"]*)"', html)


def _assert_self_contained(html):
    assert html.startswith("<!DOCTYPE html>")
    for bad in ('src="http', "src='http", "<script", "<link ", "@import", "url(http", "<iframe"):
        assert bad not in html.lower(), bad


def test_single_grpo_run(tmp_path):
    expected = _grpo_run(tmp_path / "run")
    out = build_report(tmp_path / "run")
    assert out == tmp_path / "run" / "report.html"
    html = out.read_text()
    _assert_self_contained(html)
    ids = _chart_ids(html)
    assert len(ids) == len(set(ids))
    # one chart per known metric group present, the stacked time split, and one per unlisted metric
    assert set(ids) == expected | {"time split", "my_custom"}
    assert "Other metrics (1)" in html
    assert "mean s / step" in html and ">generate<" in html and ">update<" in html
    assert "reward/math/mean" in html and "reward/format/mean" in html  # per-verifier lines in the legend
    # before (first sampled step) and after (last): the middle step is left out
    assert "Step 1 (start of training" in html and "Step 30 (end of training" in html
    assert "step30-completion2" in html and "step1-completion1" in html and "step15-" not in html
    assert XSS not in html and escape(XSS) in html
    assert "group_size: 8" in html and "beta: 0.04" in html


def test_single_sft_run_and_cli(tmp_path, capsys):
    expected = _sft_run(tmp_path / "sft")
    assert main([str(tmp_path / "sft")]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (tmp_path / "sft" / "report.html").read_text()
    _assert_self_contained(html)
    assert sorted(_chart_ids(html)) == sorted(expected)
    assert "eval_loss" in html  # the second line of the loss chart
    assert "Time split" not in html and "Sample completions" not in html


def _pipeline(tmp_path):
    root = tmp_path / "pipe"
    _sft_run(root / "stages/01_pretrain", recipe="pretrain")
    _sft_run(root / "stages/02_sft")
    _grpo_run(root / "stages/04_grpo")
    before = _eval_samples("sft", [0.0, 1.0, 0.0, 0.0])
    after = _eval_samples("grpo", [1.0, 1.0, 0.0, 1.0])[::-1]  # paired by prompt, not by position
    after[1]["completion"] = XSS
    pipe = {
        "stages": [
            {
                "name": "pretrain",
                "recipe": "pretrain",
                "dir": "stages/01_pretrain",
                "eval": _eval(0.12),
                "seconds": 41.2,
                "ref_model": None,
            },
            {
                "name": "sft",
                "recipe": "sft",
                "dir": "stages/02_sft",
                "eval": _eval(0.347, samples=before),
                "seconds": 95.0,
                "ref_model": None,
            },
            {
                "name": "dpo",
                "recipe": "preference",
                "dir": "stages/03_missing",
                "eval": _eval(0.4),
                "seconds": 20.0,
                "ref_model": "stages/02_sft/final",
            },
            {
                "name": "grpo",
                "recipe": "grpo",
                "dir": "stages/04_grpo",
                "eval": _eval(0.61, samples=after),
                "seconds": 3725.0,
                "ref_model": "stages/03_dpo/final",
            },
        ],
        "controls": [{"name": "grpo_random_reward", "of": "grpo", "eval": _eval(0.38)}],
        "baseline_eval": _eval(0.02),
        "total_seconds": 3900.0,
    }
    (root / "pipeline.json").write_text(json.dumps(pipe))
    return root


def test_pipeline_report(tmp_path):
    html = build_report(_pipeline(tmp_path)).read_text()
    _assert_self_contained(html)
    table = html[html.index("<table>") : html.index("</table>")]
    for name, acc in (
        ("before training", "2.0%"),
        ("pretrain", "12.0%"),
        ("sft", "34.7%"),
        ("dpo", "40.0%"),
        ("grpo", "61.0%"),
        ("grpo_random_reward (control of grpo)", "38.0%"),
    ):
        row = table[table.index(f"<td>{name}</td>") :]
        assert acc in row[: row.index("</tr>")], name
    assert "pass@8" in table and "maj@8" in table and "1 h 02 min" in table and "41.2 s" in table
    assert "stages/03_dpo/final" in table and "+22.7 pp" in table  # reference model, gain of sft over pretrain
    assert "3900" not in html[: html.index("</header>")] and "1 h 05 min" in html  # total time in the header
    ids = _chart_ids(html)
    assert ids.count("accuracy per stage") == 1
    assert {i for i in ids if i.startswith("pretrain: ")} == {"pretrain: " + t for t in _sft_run(tmp_path / "x")}
    assert {i for i in ids if i.startswith("grpo: ")} == {"grpo: " + t for t in _grpo_run(tmp_path / "y")} | {
        "grpo: time split",
        "grpo: my_custom",
    }
    assert "stages/03_missing" in html and "not found" in html  # a stage whose directory is gone keeps its row
    # control: the real reward beats the random one by 23 points and the intervals are apart
    assert "+23.0 pp" in html and "do not overlap" in html
    # eval samples before vs after GRPO: dpo kept none, so the comparison is against sft's, paired by prompt
    section = html[html.index('id="stage-3"') :]
    pairs = section[section.index('<table class="pairs">') :]
    pairs = pairs[: pairs.index("</table>")]
    assert "after sft" in pairs and "after grpo" in pairs
    row0 = pairs[pairs.index("q0: 2+0=?") :]
    assert row0.index("sft answer 0") < row0.index("grpo answer 0") < row0.index("</tr>")
    assert "4 eval prompts paired: 2 improved, 0 got worse, 2 unchanged" in section
    assert escape(XSS) in pairs and XSS not in html


def test_rl_warnings_diversity_majority_baseline_and_preference_trend(tmp_path):
    root = _pipeline(tmp_path)
    run = root / "stages/04_grpo"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.update(
            {
                "diversity/top_share": 0.3,
                "diversity/no_answer": 0.1,
                "diversity/group_distinct": 2.0,
                "diversity/batch_distinct": 1.5,
                "zero_variance/all_correct": 0.1,
                "zero_variance/all_wrong": 0.1,
            }
        )
        if "eval_accuracy" in r:
            r["eval_pass_at_k"] = r["eval_accuracy"] + 0.1
    rows[-1]["warning/collapse"] = 1.0
    _write_jsonl(run / "metrics.jsonl", rows)
    _write_jsonl(
        run / "warnings.jsonl",
        [{"kind": "collapse", "step": 30, "cause": f"all say 1 {XSS}", "suggestion": "audit the verifier"}],
    )
    (run / "best.json").write_text(json.dumps({"step": 20, "eval_accuracy": 0.62}))
    # A DPO run whose chosen log-probs fall (the known failure), and a stage below its majority baseline.
    dpo = root / "stages/03_missing"
    dpo.mkdir(parents=True)
    (dpo / "config.yaml").write_text(yaml.safe_dump({"recipe": "preference"}))
    prefs = [
        {"step": s, "loss": 0.7 - s / 100, "logps/chosen": -20.0 - s, "logps/rejected": -22.0 - 2 * s}
        for s in range(1, 11)
    ]
    _write_jsonl(dpo / "metrics.jsonl", prefs)
    pipe = json.loads((root / "pipeline.json").read_text())
    pipe["stages"][0]["eval"].update(majority_baseline=0.3, majority_answer="7")  # 12% < 30%: flagged
    pipe["stages"][3]["eval"].update(majority_baseline=0.3, majority_answer="7")  # 61%: not flagged
    (root / "pipeline.json").write_text(json.dumps(pipe))
    html = build_report(root).read_text()
    assert "1 warning(s) during training" in html and escape(f"all say 1 {XSS}") in html and XSS not in html
    assert "best/</code> is the model of step 20" in html and "62.0%" in html
    ids = _chart_ids(html)
    for chart in (
        "Answer diversity: share of the most common answer",
        "Held-out: greedy vs pass@k",
        "Distinct answers (per group; batch per prompt)",
    ):
        assert f"grpo: {chart}" in ids
    assert not any(i.startswith("grpo: warning") for i in ids)  # the flags are the list above, not charts
    table = html[html.index("<table>") : html.index("</table>")]
    pre = table[table.index("<td>pretrain</td>") :]
    assert "30.0% (7)" in pre[: pre.index("</tr>")] and ">below</span>" in pre[: pre.index("</tr>")]
    grpo_row = table[table.index("<td>grpo</td>") :]
    assert "30.0% (7)" in grpo_row[: grpo_row.index("</tr>")] and "badge bad" not in grpo_row[: grpo_row.index("</tr>")]
    assert "log-prob of the chosen completions -8.00, of the rejected -16.00" in html
    assert "the chosen answers became less likely too" in html


def test_missing_pieces_are_tolerated(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # torn last line
    html = build_report(run).read_text()
    assert "not valid JSON" in html and "No config.yaml" in html and _chart_ids(html) == ["Loss"]
    (run / "metrics.jsonl").unlink()
    (run / "config.yaml").write_text("recipe: sft\n")  # a run that died before its first step
    assert "No metrics.jsonl" in build_report(run).read_text()
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "pipeline.json").write_text(
        json.dumps({"stages": [{"name": "only_eval", "eval": _eval(0.5)}, {"name": "no_eval", "dir": "nowhere"}]})
    )
    html = build_report(root).read_text()
    assert "only_eval" in html and "50.0%" in html and "no_eval" in html


def test_missing_run_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_report(tmp_path / "does-not-exist")


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path, capsys):
    from posttrain.commands.main import main

    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(ReportError, match="is not a run directory"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_nice_ticks():
    assert [round(t, 9) for t in nice_ticks(0, 1)] == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert [round(t, 9) for t in nice_ticks(3e-5, 2.9e-4)] == [5e-5, 1e-4, 1.5e-4, 2e-4, 2.5e-4]
    assert nice_ticks(7, 7) == [7]
