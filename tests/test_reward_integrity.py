"""No non-finite reward is ever trained on; stateful rewards resume exactly; flat steps are skipped."""

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import GRPOConfig, config_from_dict
from posttrain.recipes import grpo
from posttrain.rewards import build_reward
from posttrain.rewards.composite import RewardFault
from posttrain.runtime.tracking import read_metrics

COMPLETIONS = ["a", "b", "c", "d"]


def _score(specs, policy, **kw):
    with build_reward(specs, non_finite=policy) as reward:
        return reward(COMPLETIONS, ["p"] * 4, {}, **kw)


def test_a_non_finite_reward_fails_naming_component_row_and_completion():
    with pytest.raises(
        RewardFault,
        match=r"reward 'inf_first' returned inf for row 0 \(data.jsonl:7\), "
        r"completion 'a'.*reward_non_finite=zero",
    ):
        _score([("faulty_rewards:inf_first", 1.0, {})], "error", where=["data.jsonl:7", "x", "y", "z"])
    with pytest.raises(RewardFault, match=r"reward 'nan_float' returned nan for row 1"):
        _score([("faulty_rewards:nan_float", 1.0, {})], "error")


def test_zero_policy_scores_faults_0_and_lists_the_rows(caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        s = _score([("faulty_rewards:inf_first", 1.0, {}), ("faulty_rewards:constant", 0.5, {})], "zero")
    assert s.total == [0.5, 0.5, 0.5, 0.5] and s.non_finite == (0,)
    assert s.components["inf_first"] == [0.0, 0.0, 0.0, 0.0]
    assert "reward_non_finite=zero: reward 'inf_first' returned inf for row 0" in caplog.text


def test_none_means_not_applicable_but_a_row_nothing_applies_to_is_a_fault():
    # None on odd rows, another weighted reward applies: those rows get the other reward only.
    s = _score([("faulty_rewards:none_odd", 1.0, {}), ("faulty_rewards:constant", 0.25, {})], "error")
    assert s.total == [0.75, 0.25, 0.75, 0.25] and s.non_finite == ()
    assert math.isnan(s.components["none_odd"][1])
    with pytest.raises(RewardFault, match=r"no weighted reward applies \(every one returned None\) for row 1"):
        _score([("faulty_rewards:none_odd", 1.0, {})], "error")
    s = _score([("faulty_rewards:none_odd", 1.0, {})], "zero")
    assert s.total == [0.5, 0.0, 0.5, 0.0] and s.non_finite == (1, 3)


def _cfg(tmp_path, *overrides, name="run"):
    return config_from_dict(
        GRPOConfig,
        {},
        [
            "model=tiny",
            "data.path=builtin:arithmetic",
            "data.num_examples=40",
            "prompts_per_step=2",
            "num_generations=4",
            "max_completion_length=6",
            "train.micro_batch_size=8",
            "samples_every=0",
            "train.progress=false",
            "optim.lr=1e-2",
            f"train.output_dir={tmp_path / name}",
            *overrides,
        ],
    )


def test_grpo_never_trains_on_an_infinite_reward(tmp_path):
    with pytest.raises(RewardFault, match=r"reward 'inf_first' returned inf for row 0 \(builtin:arithmetic\[\d+\]\)"):
        grpo.train(_cfg(tmp_path, "rewards=[faulty_rewards:inf_first]", "train.steps=1"))
    assert not (tmp_path / "run" / "final").exists()
    grpo.train(
        _cfg(
            tmp_path,
            "rewards=[faulty_rewards:inf_first, toy_rewards:ones]",
            "reward_non_finite=zero",
            "train.steps=2",
            name="zero",
        )
    )
    m = read_metrics(tmp_path / "zero")
    assert [r["reward/non_finite"] for r in m] == [1, 1]
    assert all(isinstance(r["reward/mean"], float) and 0 <= r["reward/mean"] <= 1 for r in m)
    assert all(r["reward/inf_first/mean"] == 0.0 for r in m)


def test_every_group_flat_without_dynamic_sampling_skips_the_update_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        final = grpo.train(
            _cfg(tmp_path, "rewards=[faulty_rewards:constant]", "train.steps=2", "optim.weight_decay=0.1")
        )
    assert [r.get("skipped_update") for r in read_metrics(tmp_path / "run")] == [1.0, 1.0]
    assert "every group had identical rewards on 2 of 2 steps: nothing to learn from" in caplog.text
    untouched = grpo.train(
        _cfg(tmp_path, "rewards=[faulty_rewards:constant]", "train.steps=1", "optim.lr=0", name="lr0")
    )
    a, b = load_file(final / "model.safetensors"), load_file(untouched / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # no optimizer step moved the weights


def test_resume_is_exact_with_the_spurious_control_rewards(tmp_path):
    controls = [
        "rewards=[{name: random, options: {p: 0.5}}, {name: incorrect, weight: 0.5}, "
        "{name: format_only, weight: 0.25}]",
        "reward_workers=1",
        "train.save_every=2",
        "optim.schedule=constant",
    ]  # the same lr whatever train.steps says
    grpo.train(_cfg(tmp_path, *controls, "train.steps=4", name="full"))
    grpo.train(_cfg(tmp_path, *controls, "train.steps=2", name="split"))
    grpo.train(_cfg(tmp_path, *controls, "train.steps=4", name="split"))  # resumes at step 2
    full, split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    keys = ("reward/random/mean", "reward/incorrect/mean", "reward/format_only/mean", "reward/mean", "loss")
    assert [[r.get(k) for k in keys] for r in split] == [[r.get(k) for k in keys] for r in full]
    assert len({r["reward/random/mean"] for r in full}) > 1  # the draws vary from step to step
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
