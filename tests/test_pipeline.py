import json
from pathlib import Path

import pytest

from posttrain.commands.demo import check_targets, demo_config
from posttrain.config import ConfigError, config_from_dict, to_dict
from posttrain.pipeline.stages import PipelineConfig, plan, run


def _tiny_pipeline(tmp_path, **extra):
    data = {
        "output_dir": str(tmp_path / "pipe"),
        "eval": {"data": "builtin:arithmetic?max_terms=2", "examples": 16, "k": 2, "max_new_tokens": 16},
        "stages": [
            {
                "name": "sft",
                "recipe": "sft",
                "config": {
                    "model": "tiny",
                    "data": {"path": "builtin:arithmetic?max_terms=2", "num_examples": 120, "max_length": 32},
                    "optim": {"lr": 3e-3},
                    "train": {"steps": 6, "micro_batch_size": 16, "progress": False},
                },
            },
            {
                "name": "grpo",
                "recipe": "grpo",
                "config": {
                    "data": {"path": "builtin:arithmetic?max_terms=2", "num_examples": 50, "max_length": 28},
                    "prompts_per_step": 2,
                    "num_generations": 4,
                    "max_completion_length": 12,
                    "beta": 0.05,
                    "ref_model": "sft",
                    "train": {"steps": 2, "micro_batch_size": 8, "progress": False},
                },
            },
        ],
    }
    data.update(extra)
    return config_from_dict(PipelineConfig, data)


def test_stages_chain_and_name_their_reference(tmp_path):
    cfg = _tiny_pipeline(tmp_path)
    plans = plan(cfg)
    assert plans[1].start_model == str(plans[0].final)
    assert plans[1].cfg.ref_model == str(plans[0].final) and plans[1].ref_label == "sft"
    assert plans[1].cfg.train.output_dir == str(tmp_path / "pipe" / "stages" / "02_grpo")


def test_a_control_does_not_check_held_out_accuracy_with_its_spurious_reward(tmp_path):
    cfg = _tiny_pipeline(tmp_path, controls=["random_reward"])
    grpo = cfg.stages[1].config | {
        "data": {**cfg.stages[1].config["data"], "eval_path": "builtin:arithmetic"},
        "keep_best": True,
        "stop_on": ["eval_decline", "collapse"],
    }
    cfg = config_from_dict(
        PipelineConfig,
        {
            "output_dir": cfg.output_dir,
            "controls": ["random_reward"],
            "stages": [
                {"name": "sft", "recipe": "sft", "config": cfg.stages[0].config},
                {"name": "grpo", "recipe": "grpo", "config": grpo},
            ],
        },
    )
    real, control = plan(cfg)[1:]
    assert real.cfg.data.eval_path and real.cfg.keep_best
    assert control.cfg.rewards[0].name == "random"
    assert (control.cfg.data.eval_path, control.cfg.keep_best, control.cfg.stop_on) == ("", False, ("collapse",))


def test_a_typo_in_a_later_stage_fails_before_anything_runs(tmp_path):
    cfg = _tiny_pipeline(tmp_path)
    bad = cfg.stages[1].config | {"prompts_per_stepp": 3}
    data = {
        "output_dir": str(tmp_path / "p"),
        "stages": [
            {"name": "sft", "recipe": "sft", "config": cfg.stages[0].config},
            {"name": "grpo", "recipe": "grpo", "config": bad},
        ],
    }
    with pytest.raises(ConfigError, match=r"stages\[1\] \(grpo\): unknown config key 'prompts_per_stepp'"):
        plan(config_from_dict(PipelineConfig, data))
    assert not (tmp_path / "p" / "stages").exists()
    with pytest.raises(ConfigError, match="controls: unknown control"):
        config_from_dict(PipelineConfig, data | {"controls": ["random"]})


def test_pipeline_runs_evaluates_controls_and_skips_completed_stages(tmp_path, caplog):
    cfg = _tiny_pipeline(tmp_path, controls=["random_reward"])
    summary = run(cfg)
    root = tmp_path / "pipe"
    assert [e["name"] for e in summary["stages"]] == ["sft", "grpo"]
    for e in summary["stages"]:
        ev = e["eval"]
        assert 0 <= ev["greedy_accuracy"] <= 1 and ev["n_prompts"] == 16 and ev["k"] == 2
        assert ev["greedy_ci"][0] <= ev["greedy_accuracy"] <= ev["greedy_ci"][1]
        assert (root / e["dir"] / "final" / "COMPLETE").exists()
    (control,) = summary["controls"]
    assert control["of"] == "grpo" and control["name"] == "grpo_random_reward"
    cfg_text = (root / "controls" / "grpo_random_reward" / "config.yaml").read_text()
    assert "name: random" in cfg_text
    assert (root / "report.html").exists() and "grpo_random_reward" in (root / "report.html").read_text()
    marker = root / "stages" / "01_sft" / "final" / "model.safetensors"
    before = marker.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="posttrain"):
        again = run(cfg)
    assert marker.stat().st_mtime_ns == before
    assert "stage sft: complete, skipped" in caplog.text and "stage grpo: complete, skipped" in caplog.text
    assert [e["eval"] for e in again["stages"]] == [e["eval"] for e in summary["stages"]]
    assert json.loads((root / "pipeline.json").read_text())["stages"][0]["name"] == "sft"
    # the rerun keeps the recorded total time (it used to overwrite it with its own few milliseconds)
    assert again["total_seconds"] >= summary["total_seconds"] >= sum(e["seconds"] for e in summary["stages"])


def test_a_stage_that_loads_no_reference_names_none():
    """GRPO with beta 0 has a ref_model field (default 'initial') but loads no reference: the plan, the
    summary and the report used to name 'initial (sft)' as its reference model."""
    grpo = _tiny_pipeline(Path("/tmp"))
    data = {**grpo.stages[1].config, "beta": 0.0}
    cfg = config_from_dict(
        PipelineConfig,
        {**to_dict(grpo), "stages": [to_dict(grpo.stages[0]), {**to_dict(grpo.stages[1]), "config": data}]},
    )
    assert [p.ref_label for p in plan(cfg)] == ["", ""]
    assert [p.ref_label for p in plan(grpo)] == ["", "sft"]  # beta 0.05 against the SFT model: named


def test_demo_config_is_a_valid_pipeline_and_fast_mode_shrinks_it():
    full = config_from_dict(PipelineConfig, demo_config(False, "runs/x"))
    fast = config_from_dict(PipelineConfig, demo_config(True, "runs/x"))
    assert [s.name for s in full.stages] == ["pretrain", "sft", "dpo", "grpo"]
    assert [s.recipe for s in full.stages] == ["pretrain", "sft", "preference", "grpo"]
    steps = {p.name: p.cfg.train.steps for p in plan(fast)}
    assert steps == {"pretrain": 60, "sft": 30, "dpo": 5, "grpo": 3}
    g = plan(full)[3].cfg
    assert (g.aggregation, g.eps_low, g.eps_high, g.dynamic_sampling, g.beta) == ("token_mean", 0.2, 0.28, True, 0.0)


def test_a_tasks_own_rl_budget_applies_but_fast_mode_still_wins():
    from posttrain.commands.demo import assemble

    def rl(data):
        return {
            p.name: (p.cfg.train.steps, p.cfg.optim.lr)
            for p in plan(config_from_dict(PipelineConfig, data))
            if p.recipe == "grpo"
        }

    assert rl(assemble("clauses", "runs/x")) == {"grpo": (200, 1e-4)}
    assert rl(assemble("clauses", "runs/x", judge=True)) == {"grpo_judge": (200, 1e-4), "grpo": (200, 1e-4)}
    assert rl(assemble("extraction", "runs/x"))["grpo"][0] == 200
    assert rl(assemble("extraction", "runs/x", fast=True))["grpo"][0] == 3  # was 200: use_task came after --fast
    assert rl(assemble("clauses", "runs/x", fast=True, judge=True)) == {"grpo_judge": (3, 1e-4), "grpo": (3, 1e-4)}


def test_check_targets_flags_a_drop_and_the_grpo_gain():
    s = {
        "stages": [
            {"name": "sft", "recipe": "sft", "eval": {"greedy_accuracy": 0.4, "greedy_ci": [0.37, 0.43]}},
            {"name": "dpo", "recipe": "preference", "eval": {"greedy_accuracy": 0.35, "greedy_ci": [0.3, 0.4]}},
            {"name": "grpo", "recipe": "grpo", "eval": {"greedy_accuracy": 0.345, "greedy_ci": [0.3, 0.4]}},
            {"name": "grpo2", "recipe": "grpo", "eval": {"greedy_accuracy": 0.6, "greedy_ci": [0.55, 0.65]}},
        ]
    }
    lines = check_targets(s)
    assert "dpo: 40.0% -> 35.0% (-5.0 points, LOWER)" in lines
    assert "grpo: 35.0% -> 34.5% (-0.5 points, within noise)" in lines
    assert "GRPO gain over grpo: +25.5 points (target >= 15: met)" in lines


def test_demo_fast_runs_end_to_end(tmp_path):
    from posttrain.commands.demo import main

    assert main(["--fast", "--output", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "pipeline.json").read_text())
    assert [e["name"] for e in summary["stages"]] == ["pretrain", "sft", "dpo", "grpo"]
    html = (tmp_path / "demo" / "report.html").read_text()
    for name in ("pretrain", "sft", "dpo", "grpo"):
        assert name in html


def test_a_branching_pipeline_resolves_stage_names_wherever_a_model_is_named(tmp_path):
    data = demo_config(True, str(tmp_path / "p"), rlhf=True)
    plans = {p.name: p for p in plan(config_from_dict(PipelineConfig, data))}
    sft, rm = str(plans["sft"].final), str(plans["rm"].final)
    assert plans["rm"].start_model == sft and plans["rm"].pairs is not None
    assert plans["rm"].cfg.data.path == str(plans["rm"].dir / "pairs.jsonl")
    ppo = plans["ppo"]
    assert ppo.start_model == sft and ppo.start_stage == "sft" and ppo.cfg.critic.init == "reward_model"
    assert [r.options.get("path") for r in ppo.cfg.rewards] == [None, rm]  # `path: rm` -> the rm stage's model
    assert [r.weight for r in ppo.cfg.rewards] == [0.0, 1.0]
    assert plans["grpo"].start_model == sft and plans["grpo"].start_stage == "sft"
    critic_dir = dict(
        data,
        stages=[
            *data["stages"][:2],
            {**data["stages"][3], "config": {**data["stages"][3]["config"], "critic": {"init": "sft"}}},
        ],
    )
    assert plan(config_from_dict(PipelineConfig, critic_dir))[2].cfg.critic.init == sft
    with pytest.raises(ConfigError, match=r"make_pairs only applies to preference and reward_model stages"):
        bad = dict(
            data, stages=[*data["stages"][:4], {**data["stages"][4], "make_pairs": {"data": "builtin:arithmetic"}}]
        )
        plan(config_from_dict(PipelineConfig, bad))


def test_check_targets_compares_a_branch_with_the_stage_it_started_from():
    ev = lambda a: {"greedy_accuracy": a, "greedy_ci": [a - 0.05, a + 0.05]}  # noqa: E731
    s = {
        "stages": [
            {"name": "sft", "recipe": "sft", "eval": ev(0.4)},
            {"name": "rm", "recipe": "reward_model", "eval": {"kind": "pairs", "pair_accuracy": 0.8}},
            {"name": "ppo", "recipe": "ppo", "eval": ev(0.3), "start_stage": "sft"},
            {"name": "grpo", "recipe": "grpo", "eval": ev(0.7), "start_stage": "sft"},
        ]
    }
    lines = check_targets(s)
    assert "PPO (critic + reward model) gain over sft: -10.0 points" in lines
    assert "GRPO gain over sft: +30.0 points (target >= 15: met)" in lines


def test_rlhf_demo_fast_runs_both_branches_and_reports_them_side_by_side(tmp_path):
    from posttrain.commands.demo import main

    assert main(["--rlhf", "--fast", "--output", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "pipeline.json").read_text())
    assert [e["name"] for e in summary["stages"]] == ["pretrain", "sft", "rm", "ppo", "grpo"]
    rm = summary["stages"][2]["eval"]
    assert rm["kind"] == "pairs" and 0 <= rm["pair_accuracy"] <= 1 and rm["n_pairs"] > 0
    assert summary["stages"][3]["start_stage"] == "sft" == summary["stages"][4]["start_stage"]
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "RLHF (PPO with a critic + reward model) vs GRPO" in html and "Proxy reward vs gold" in html
    assert "x ppo&#x27;s peak" in html or "x ppo's peak" in html
    # the learning columns: each RL stage's gain over the SFT model it started from, and its truncation
    sft = summary["stages"][1]["eval"]["greedy_accuracy"]
    for e in summary["stages"][3:]:
        assert f"{100 * (e['eval']['greedy_accuracy'] - sft):+.1f} pts" in html
    assert "gain over its start" in html and "truncated (last 20 steps)" in html


def test_every_problem_of_every_stage_is_reported_before_anything_runs(tmp_path, capsys):
    import yaml

    from posttrain.commands.main import main

    cfg = _tiny_pipeline(tmp_path)
    stages = [dict(s) for s in (to_plain(st) for st in cfg.stages)]
    stages[0]["config"]["data"]["path"] = str(tmp_path / "missing.jsonl")
    stages[1]["config"]["rewards"] = [{"name": "mathh"}, {"name": "no_such_module:fn"}]
    data = {
        "output_dir": str(tmp_path / "pipe"),
        "stages": stages,
        "eval": {"data": "builtin:arithmetic", "verifier": "math", "verifier_options": {"timout": 3}},
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s), no stage was started" in err and str(path) in err
    assert "eval.verifier='math': verifier 'math': unknown option(s) ['timout']" in err
    assert f"stages[0] (sft): data.path='{tmp_path / 'missing.jsonl'}': " in err
    assert "stages[1] (grpo): rewards[0].name='mathh': unknown verifier 'mathh'; did you mean 'math'?" in err
    assert "stages[1] (grpo): rewards[1].name='no_such_module:fn': cannot import module 'no_such_module'" in err
    assert not (tmp_path / "pipe").exists()


def test_a_reward_module_next_to_the_pipeline_config_is_found(tmp_path, monkeypatch):
    import yaml

    from posttrain.commands.main import main

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "pipe_local_rewards.py").write_text(
        "def short(completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    cfg = _tiny_pipeline(tmp_path)
    stages = [to_plain(st) for st in cfg.stages]
    stages[1]["config"]["rewards"] = [{"name": "pipe_local_rewards:short"}]
    (conf / "p.yaml").write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "pipe"),
                "stages": stages,
                "eval": {"data": "builtin:arithmetic?max_terms=2", "examples": 4, "k": 0, "max_new_tokens": 8},
            }
        )
    )
    monkeypatch.chdir(tmp_path)  # neither the working directory nor sys.path holds the module
    assert main(["pipeline", str(conf / "p.yaml")]) == 0
    assert (tmp_path / "pipe" / "stages" / "02_grpo" / "final" / "COMPLETE").exists()


def to_plain(stage):
    from posttrain.config import to_dict

    return to_dict(stage)


def test_a_complete_stage_whose_config_changed_is_not_silently_skipped(tmp_path):
    import yaml

    from posttrain.config import to_dict
    from posttrain.run.preflight import pipeline_problems

    cfg = _tiny_pipeline(tmp_path)
    plans = plan(cfg)
    sft = plans[0]
    (sft.final).mkdir(parents=True)
    (sft.final / "COMPLETE").write_text("ok\n")
    saved = {"recipe": "sft", **to_dict(sft.cfg)}
    saved["optim"]["lr"] = 0.5  # what the finished stage was trained with
    (sft.dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (problem,) = pipeline_problems(cfg, plans)
    assert problem.startswith("stages[0] (sft): ") and "is complete, but with another config" in problem
    assert "optim.lr: 0.5 -> 0.003" in problem
    with pytest.raises(ConfigError, match="eval.split: 'dev' cannot apply to the file 'held_out.jsonl'"):
        config_from_dict(
            PipelineConfig,
            {"eval": {"data": "held_out.jsonl", "split": "dev"}, "stages": [{"name": "s", "recipe": "sft"}]},
        )


def test_dynamic_sampling_ablation_spends_the_same_generation_per_step(tmp_path):
    from posttrain.pipeline.evidence import run_ablation
    from posttrain.report import build_report
    from posttrain.runtime.tracking import read_metrics

    cfg = config_from_dict(
        PipelineConfig,
        {
            "output_dir": str(tmp_path / "pipe"),
            "eval": {"data": "builtin:arithmetic?max_terms=2", "examples": 8, "k": 0, "max_new_tokens": 8},
            "stages": [
                {
                    "name": "grpo",
                    "recipe": "grpo",
                    "config": {
                        "model": "tiny",
                        "data": {"path": "builtin:arithmetic?max_terms=2", "num_examples": 40, "max_length": 16},
                        "rewards": ["toy_rewards:parity"],
                        "prompts_per_step": 2,
                        "num_generations": 4,
                        "max_completion_length": 6,
                        "dynamic_sampling": True,
                        "max_gen_batches": 3,
                        "train": {"steps": 2, "micro_batch_size": 16, "progress": False},
                    },
                }
            ],
        },
    )
    run(cfg)
    root = tmp_path / "pipe"
    result = run_ablation(root, cfg)
    on = read_metrics(root / "stages" / "01_grpo")
    off = read_metrics(root / "controls" / "grpo_no_dynamic_sampling")
    rounds = sum(m["gen_rounds"] for m in on) / len(on)
    assert result["off"]["prompts_per_step"] == max(1, round(2 * rounds))
    assert all(m["gen_rounds"] == 1 for m in off) and len(off) == len(on)
    assert result["on"]["eval"]["n_prompts"] == result["off"]["eval"]["n_prompts"] == 8
    assert json.loads((root / "ablations.json").read_text())[0]["of"] == "grpo"
    assert "Ablation" in build_report(root).read_text()
