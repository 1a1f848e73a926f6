"""The demo as evidence: seeds and tasks change only what they should, the per-seed table, and the
dynamic-sampling ablation's equal generation budget."""

import copy

import pytest

from posttrain.commands.demo import demo_config
from posttrain.config import GRPOConfig, config_from_dict
from posttrain.pipeline.evidence import (
    TASK_DATA,
    ablation_config,
    generated_tokens,
    parse_seeds,
    seed_row,
    seed_table,
    use_seed,
    use_task,
)
from posttrain.pipeline.stages import PipelineConfig, plan


def _without_data_paths(data):
    d = copy.deepcopy(data)
    d["eval"].pop("data")
    for s in d["stages"]:
        s["config"].get("data", {}).pop("path", None)
        s["config"].get("data", {}).pop("eval_path", None)
        s.get("make_pairs", {}).pop("data", None)
    return d


def test_another_task_changes_only_the_data():
    arith = use_task(demo_config(False, "runs/x"), "arithmetic")
    count = use_task(demo_config(False, "runs/x"), "counting")
    assert _without_data_paths(arith) == _without_data_paths(count)  # the recipe itself is unchanged
    plans = {p.name: p for p in plan(config_from_dict(PipelineConfig, count))}
    assert plans["pretrain"].cfg.data.path == TASK_DATA["counting"]["pretrain"]
    assert plans["sft"].cfg.data.path == TASK_DATA["counting"]["sft"]
    assert plans["grpo"].cfg.data.path == TASK_DATA["counting"]["rl"]
    assert (
        count["eval"]["data"] == TASK_DATA["counting"]["rl"]
        and count["stages"][2]["make_pairs"]["data"] == TASK_DATA["counting"]["rl"]
    )
    # The shipped YAML is the arithmetic demo exactly: use_task("arithmetic") changes nothing.
    assert arith == demo_config(False, "runs/x")
    with pytest.raises(ValueError, match="unknown demo task"):
        use_task(demo_config(False, "runs/x"), "sorting")


def test_a_seed_reaches_every_stage_but_not_the_held_out_set():
    cfg = config_from_dict(PipelineConfig, use_seed(demo_config(True, "runs/x"), 7))
    assert {p.cfg.train.seed for p in plan(cfg)} == {7}
    assert cfg.seed == 0  # the evaluation rows and samples stay the same across seeds
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,0", "a", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def _ev(acc, lo, hi):
    return {"greedy_accuracy": acc, "greedy_ci": [lo, hi], "majority_baseline": 0.1}


def test_seed_row_and_table():
    summary = {
        "stages": [
            {"name": "pretrain", "recipe": "pretrain", "eval": _ev(0.0, 0.0, 0.02), "seconds": 60.0},
            {"name": "sft", "recipe": "sft", "eval": _ev(0.40, 0.33, 0.47), "seconds": 20.0},
            {"name": "dpo", "recipe": "preference", "eval": _ev(0.45, 0.38, 0.52), "seconds": 10.0},
            {"name": "grpo", "recipe": "grpo", "eval": _ev(0.62, 0.55, 0.68), "seconds": 210.0},
        ]
    }
    row = seed_row(3, summary)
    assert row["grpo_gain"] == pytest.approx(0.17) and row["grpo_significant"] is True
    assert row["dpo_gain"] == pytest.approx(0.05) and row["seconds"] == 300.0
    weak = copy.deepcopy(summary)
    weak["stages"][3]["eval"] = _ev(0.55, 0.48, 0.62)
    table = seed_table([row, seed_row(4, weak)])
    assert (
        "| 3 | 40.0 [33.0, 47.0] | 45.0 [38.0, 52.0] (+5.0) | 62.0 [55.0, 68.0] | +17.0 (met; intervals apart) | 5.0 min |"
        in table
    )
    assert "+10.0 (NOT met; intervals overlap)" in table and "min +10.0 over 2 seed(s)" in table
    assert "every seed: NOT met; significant (95% intervals apart) on every seed: no." in table


def test_generated_tokens_and_the_ablation_budget():
    metrics = [
        {"step": 1, "gen_rounds": 3, "completion_len/mean": 10.0},
        {"step": 2, "gen_rounds": 2, "completion_len/mean": 20.0},
    ]
    assert generated_tokens(metrics, 4, 8) == 3 * 4 * 8 * 10 + 2 * 4 * 8 * 20
    cfg = config_from_dict(GRPOConfig, {}, ["prompts_per_step=16", "dynamic_sampling=true", "train.steps=50"])
    abl = ablation_config(cfg, metrics, "out")
    # on: 2.5 rounds of 16 groups per step on average -> off: 40 groups per step, all trained on
    assert (abl.dynamic_sampling, abl.prompts_per_step, abl.train.steps, abl.optim) == (False, 40, 50, cfg.optim)
    assert abl.train.output_dir == "out" and abl.num_generations == cfg.num_generations


def test_demo_seeds_runs_one_pipeline_per_seed_and_writes_the_table(tmp_path, monkeypatch, capsys):
    import json

    import posttrain.commands.demo as demo
    from posttrain.commands.demo import main

    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        seed = cfg.stages[0].config["train"]["seed"]
        acc = {"pretrain": 0.0, "sft": 0.3, "preference": 0.35, "grpo": 0.5 + 0.01 * seed}
        return {
            "stages": [
                {
                    "name": s.name,
                    "recipe": s.recipe,
                    "seconds": 1.0,
                    "eval": _ev(acc[s.recipe], acc[s.recipe] - 0.05, acc[s.recipe] + 0.05),
                }
                for s in cfg.stages
            ],
            "controls": [],
        }

    monkeypatch.setattr(demo, "run", fake_run)
    assert main(["--fast", "--seeds", "0,2", "--task", "counting", "--output", str(tmp_path)]) == 0
    assert [c.output_dir for c in seen] == [str(tmp_path / "seed0"), str(tmp_path / "seed2")]
    assert [{s.config["train"]["seed"] for s in c.stages} for c in seen] == [{0}, {2}]
    assert all(c.eval.data == TASK_DATA["counting"]["rl"] for c in seen)
    rows = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["seed"] for r in rows] == [0, 2] and rows[1]["grpo_gain"] == pytest.approx(0.17)
    assert (
        "| 2 | 30.0 [25.0, 35.0] | 35.0 [30.0, 40.0] (+5.0) | 52.0 [47.0, 57.0] | +17.0 (met; intervals apart)"
        in (tmp_path / "seeds.md").read_text()
    )
    assert "counting, seeds 0,2:" in capsys.readouterr().out
